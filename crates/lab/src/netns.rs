//! Network namespaces for the database nodes, so that `scaleout chaos` can
//! cut the network between them for real.
//!
//! Each node gets its own namespace with one veth link into a bridge; the
//! bridge lives in a namespace of its own (`scaleout-<pid>-br`), joined
//! to the lab's namespace by one more veth pair whose lab end holds the
//! lab's address on a private /24 (10.200–249.x.0/24, picked from the
//! lab's PID); the nodes hold .11, .12, ... Web servers and the lab reach
//! every node through the bridge. The bridge has a namespace of its own
//! because a host running Docker filters bridged traffic through its
//! iptables `FORWARD` chain, whose policy Docker sets to `DROP`: in the
//! bridge's own namespace that chain is empty, and the host's rules stay
//! untouched.
//! A partition between two nodes is a pair of blackhole routes, one in
//! each node's namespace: their packets to each other vanish (a silent
//! drop, as a broken link looks: connections hang until timeouts), while
//! both stay reachable from the web tier. Everything is made with `ip`
//! from iproute2 and removed on drop.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

/// The namespaces of one lab run.
pub struct Net {
    tag: u32,
    bridge: String,
    prefix: [u8; 3],
    nodes: usize,
    /// Cut pairs (a < b), to heal.
    cut: BTreeSet<(usize, usize)>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Makes a bridge and `nodes` namespaces joined to it; an error says
    /// why it cannot (no `ip`, no permission to make namespaces).
    pub fn create(nodes: usize) -> Result<Net, String> {
        sweep_stale();
        let tag = std::process::id();
        let prefix = [10, 200 + ((tag >> 8) % 50) as u8, (tag % 256) as u8];
        let mut net = Net {
            tag,
            bridge: format!("sob{tag}"),
            prefix,
            nodes: 0,
            cut: BTreeSet::new(),
        };
        let lab = format!("{}/24", net.lab_addr());
        let br = net.bridge_namespace();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        // The lab's leg: its end here holds the lab's address.
        ip(&[
            "link",
            "add",
            &net.bridge,
            "type",
            "veth",
            "peer",
            "name",
            "lab",
            "netns",
            &br,
        ])?;
        ip(&["-n", &br, "link", "set", "lab", "master", "br0"])?;
        ip(&["-n", &br, "link", "set", "lab", "up"])?;
        ip(&["addr", "add", &lab, "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        for i in 0..nodes {
            let ns = net.namespace(i);
            let veth = format!("n{i}");
            let addr = format!("{}/24", net.addr(i));
            ip(&["netns", "add", &ns])?;
            net.nodes = i + 1;
            ip(&[
                "-n", &br, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &br, "link", "set", &veth, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &veth, "up"])?;
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// The lab's own address on the bridge.
    pub fn lab_addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// Node `i`'s address (0-based).
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, 11 + i as u8)
    }

    /// Node `i`'s namespace name.
    pub fn namespace(&self, i: usize) -> String {
        format!("scaleout-{}-{i}", self.tag)
    }

    /// The namespace the bridge lives in.
    fn bridge_namespace(&self) -> String {
        format!("scaleout-{}-br", self.tag)
    }

    fn blackhole(&self, verb: &str, a: usize, b: usize) -> Result<(), String> {
        let (na, nb) = (self.namespace(a), self.namespace(b));
        let (to_b, to_a) = (
            format!("{}/32", self.addr(b)),
            format!("{}/32", self.addr(a)),
        );
        ip(&["-n", &na, "route", verb, "blackhole", &to_b])?;
        ip(&["-n", &nb, "route", verb, "blackhole", &to_a])
    }

    /// Cuts the link between nodes `a` and `b` (both directions).
    pub fn cut(&mut self, a: usize, b: usize) -> Result<(), String> {
        let pair = (a.min(b), a.max(b));
        if a == b || self.cut.contains(&pair) {
            return Ok(());
        }
        self.blackhole("add", pair.0, pair.1)?;
        self.cut.insert(pair);
        Ok(())
    }

    /// Separates `side` from every other node.
    pub fn partition(&mut self, side: &[usize]) -> Result<(), String> {
        for &a in side {
            for b in (0..self.nodes).filter(|b| !side.contains(b)) {
                self.cut(a, b)?;
            }
        }
        Ok(())
    }

    /// Restores every cut link.
    pub fn heal(&mut self) -> Result<(), String> {
        let pairs = std::mem::take(&mut self.cut);
        let mut first_error = Ok(());
        for (a, b) in pairs {
            if let Err(e) = self.blackhole("del", a, b) {
                if first_error.is_ok() {
                    first_error = Err(e);
                }
            }
        }
        first_error
    }
}

/// Removes what runs that were killed before they could clean up left
/// behind (namespaces and bridges named after a PID no longer alive).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("scaleout-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
            let _ = ip(&["link", "del", &format!("sob{pid}")]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            // Deleting the namespace deletes its end of the veth pair, and
            // with it the lab's end.
            let _ = ip(&["netns", "del", &self.namespace(i)]);
        }
        // The bridge's namespace takes the bridge and the lab's leg.
        let _ = ip(&["netns", "del", &self.bridge_namespace()]);
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether node `from` can connect to node 0's listener.
    fn probe(net: &Net, from: usize) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &net.namespace(from), "python3", "-c"])
            .arg(format!(
                "import socket,sys,time\nfor _ in range(50):\n  try:\n    socket.create_connection(('{}',7000),timeout=1).close();sys.exit(0)\n  except ConnectionRefusedError:\n    time.sleep(0.1)\n  except OSError:\n    sys.exit(1)\nsys.exit(1)",
                net.addr(0)
            ))
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Real namespaces: skipped (with a note) where they cannot be made.
    #[test]
    fn a_cut_link_drops_packets_between_two_nodes_and_heals() {
        let mut net = match Net::create(3) {
            Ok(net) => net,
            Err(e) => {
                eprintln!("skipped: no network namespaces here: {e}");
                return;
            }
        };
        // A listener in node 0's namespace, probed from node 1's and 2's
        // with a short connect timeout: `ip netns exec` runs the prober.
        let _server = KillOnDrop(Command::new("ip")
            .args(["netns", "exec", &net.namespace(0), "python3", "-c"])
            .arg(format!(
                "import socket,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{}',7000));s.listen(16)\nwhile True:\n  c,_=s.accept();c.close()",
                net.addr(0)
            ))
            .spawn()
            .expect("python3 in the namespace"));
        assert!(probe(&net, 1) && probe(&net, 2), "all linked at first");
        net.partition(&[0]).unwrap();
        assert!(!probe(&net, 1) && !probe(&net, 2), "node 0 cut off");
        net.heal().unwrap();
        net.cut(0, 2).unwrap();
        assert!(probe(&net, 1), "only the cut link is down");
        assert!(!probe(&net, 2), "the cut link is down");
        net.heal().unwrap();
        assert!(probe(&net, 2), "healed");
    }

    /// The listener goes even when an assertion fails.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
