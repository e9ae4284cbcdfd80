//! The Kubernetes manifests in `deploy/k8s/`, parsed into the API's own
//! types (`k8s-openapi`, Kubernetes 1.33) and held to the rules a cluster
//! would not check for us: selectors match their pods' labels, probes
//! point at ports the container has and paths the role serves, the
//! voters are an odd number and the disruption budget keeps a quorum,
//! each StatefulSet's peers are behind a headless Service, every
//! container runs unprivileged on a read-only root with requests set,
//! and its flags are ones this binary takes. No cluster is reachable from
//! here: what a real one would do (scheduling, the volumes' provisioner,
//! the pods' DNS names) is left untested.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, PodTemplateSpec, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn k8s_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s")
}

/// Every manifest of every file, by kind.
#[derive(Default)]
struct Manifests {
    services: Vec<Service>,
    statefulsets: Vec<StatefulSet>,
    deployments: Vec<Deployment>,
    budgets: Vec<PodDisruptionBudget>,
    policies: Vec<NetworkPolicy>,
}

fn load() -> Manifests {
    let mut all = Manifests::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = serde_norway::Value::deserialize(doc).unwrap();
            let kind = value["kind"].as_str().unwrap_or("").to_string();
            let parse =
                |v: serde_norway::Value| -> serde_json::Value { serde_json::to_value(v).unwrap() };
            let json = parse(value);
            let at = format!("{} ({kind})", file.display());
            match kind.as_str() {
                "Service" => all.services.push(serde_json::from_value(json).expect(&at)),
                "StatefulSet" => all
                    .statefulsets
                    .push(serde_json::from_value(json).expect(&at)),
                "Deployment" => all
                    .deployments
                    .push(serde_json::from_value(json).expect(&at)),
                "PodDisruptionBudget" => all.budgets.push(serde_json::from_value(json).expect(&at)),
                "NetworkPolicy" => all.policies.push(serde_json::from_value(json).expect(&at)),
                other => panic!("{at}: a kind this test does not know: {other:?}"),
            }
        }
    }
    all
}

use k8s_openapi::serde::Deserialize as _;

fn labels(template: &PodTemplateSpec) -> BTreeMap<String, String> {
    template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The paths each role serves to probes.
fn serves(role: &str, path: &str) -> bool {
    match role {
        "db" | "web" | "lb" => ["/readyz", "/healthz"].contains(&path),
        "dns" => path == "/healthz",
        _ => false,
    }
}

fn check_container(at: &str, c: &Container) {
    let role = c
        .args
        .as_ref()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_default();
    let ports: BTreeMap<String, i32> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    for (which, probe) in [
        ("readiness", &c.readiness_probe),
        ("liveness", &c.liveness_probe),
    ] {
        let probe = probe
            .as_ref()
            .unwrap_or_else(|| panic!("{at}: no {which} probe"));
        let get = probe.http_get.as_ref().expect("an HTTP probe");
        let path = get.path.as_deref().unwrap_or("/");
        assert!(
            serves(&role, path),
            "{at}: {which} probe on {path}, which {role} does not serve"
        );
        let port_ok = match &get.port {
            IntOrString::String(name) => ports.contains_key(name),
            IntOrString::Int(n) => ports.values().any(|p| p == n),
        };
        assert!(
            port_ok,
            "{at}: {which} probe on port {:?}, not one of {ports:?}",
            get.port
        );
    }
    if role == "db" {
        assert!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref()
                == Some("/readyz"),
            "{at}: a database node is ready when it has a leader"
        );
    }
    let security = c
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{at}: no securityContext"));
    assert_eq!(security.read_only_root_filesystem, Some(true), "{at}");
    assert_eq!(security.allow_privilege_escalation, Some(false), "{at}");
    let drops = security
        .capabilities
        .as_ref()
        .and_then(|c| c.drop.clone())
        .unwrap_or_default();
    assert!(
        drops.contains(&"ALL".to_string()),
        "{at}: capabilities not dropped"
    );
    let requests = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .unwrap_or_default();
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "{at}: no requests"
    );
    // The flags, with the pod's name where Kubernetes puts it, are ones
    // this binary takes.
    let args: Vec<String> = c
        .args
        .iter()
        .flatten()
        .map(|a| a.replace("$(POD_NAME)", "scaleout-db-0"))
        .collect();
    let out = std::process::Command::new(common::BIN)
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{at}: scaleout {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check_pods(at: &str, template: &PodTemplateSpec) {
    let spec = template.spec.as_ref().unwrap();
    let pod = spec
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{at}: no pod securityContext"));
    assert_eq!(pod.run_as_non_root, Some(true), "{at}");
    assert!(pod.run_as_user.is_some_and(|u| u != 0), "{at}");
    // /tmp, where a token is made, is a volume on a read-only root.
    for c in &spec.containers {
        check_container(&format!("{at}/{}", c.name), c);
    }
}

#[test]
fn the_manifests_hold_together() {
    let m = load();
    let headless = |name: &str| {
        m.services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .and_then(|s| s.spec.as_ref())
            .is_some_and(|s| s.cluster_ip.as_deref() == Some("None"))
    };
    // Every Service selects some pods.
    let mut pod_labels: Vec<BTreeMap<String, String>> = Vec::new();
    for s in &m.statefulsets {
        let name = s.metadata.name.clone().unwrap();
        let spec = s.spec.as_ref().unwrap();
        let selector = spec.selector.match_labels.clone().unwrap_or_default();
        assert!(
            selects(&selector, &labels(&spec.template)),
            "{name}: its selector misses its pods"
        );
        assert!(
            headless(&spec.service_name.clone().unwrap_or_default()),
            "{name}: peers need a headless Service"
        );
        assert!(
            !spec
                .volume_claim_templates
                .clone()
                .unwrap_or_default()
                .is_empty(),
            "{name}: no volume"
        );
        check_pods(&name, &spec.template);
        pod_labels.push(labels(&spec.template));
    }
    for d in &m.deployments {
        let name = d.metadata.name.clone().unwrap();
        let spec = d.spec.as_ref().unwrap();
        let selector = spec.selector.match_labels.clone().unwrap_or_default();
        assert!(
            selects(&selector, &labels(&spec.template)),
            "{name}: its selector misses its pods"
        );
        check_pods(&name, &spec.template);
        pod_labels.push(labels(&spec.template));
    }
    for s in &m.services {
        let name = s.metadata.name.clone().unwrap();
        let selector = s
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default();
        assert!(
            pod_labels.iter().any(|l| selects(&selector, l)),
            "{name}: selects no pods"
        );
    }
    // The voters: an odd number, and the budget keeps a majority of them.
    let voters = m
        .statefulsets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("scaleout-db"))
        .expect("the voters' StatefulSet");
    let spec = voters.spec.as_ref().unwrap();
    let n = spec.replicas.unwrap_or(1);
    assert!(n % 2 == 1 && n >= 3, "{n} voters");
    let args = spec.template.spec.as_ref().unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(!args.contains(&"--read-only".to_string()), "voters vote");
    let pdb = m
        .budgets
        .iter()
        .find(|b| {
            let sel = b
                .spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .and_then(|s| s.match_labels.clone())
                .unwrap_or_default();
            selects(&sel, &labels(&spec.template))
        })
        .expect("a disruption budget for the voters");
    let quorum = n / 2 + 1;
    match pdb.spec.as_ref().unwrap().min_available.as_ref() {
        Some(IntOrString::Int(min)) => {
            assert!(*min >= quorum, "minAvailable {min} < quorum {quorum}")
        }
        other => panic!("the budget's minAvailable: {other:?}"),
    }
    // Every node gets the voters' list, pod 0 first, by their stable
    // names: one per voter.
    let want: Vec<String> = (0..n)
        .map(|i| format!("http://scaleout-db-{i}.scaleout-db:4001"))
        .collect();
    for s in &m.statefulsets {
        let spec = s.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let args = spec.containers[0].args.clone().unwrap();
        let join = args
            .iter()
            .position(|a| a == "--join")
            .map(|i| args[i + 1].clone());
        assert_eq!(join, Some(want.join(",")), "{:?}", s.metadata.name);
    }
    // The load balancers find the web servers through their headless Service.
    let lb = m
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("scaleout-lb"))
        .unwrap();
    let args = lb
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    let found = args
        .iter()
        .position(|a| a == "--discover")
        .map(|i| args[i + 1].clone())
        .unwrap();
    assert!(found.starts_with("http://scaleout-web:"), "{found}");
    assert!(
        headless("scaleout-web"),
        "discovery needs every pod's address"
    );
    // The database takes connections from the web servers and itself
    // only: its policy selects the database's pods, Raft's port is open
    // to no one else.
    let policy = m
        .policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("scaleout-db"))
        .expect("a NetworkPolicy for the database");
    let rules = policy
        .spec
        .as_ref()
        .unwrap()
        .ingress
        .clone()
        .unwrap_or_default();
    let raft_open_to: Vec<String> = rules
        .iter()
        .filter(|r| {
            r.ports
                .iter()
                .flatten()
                .any(|p| p.port == Some(IntOrString::Int(4002)))
        })
        .flat_map(|r| r.from.clone().unwrap_or_default())
        .map(|peer| format!("{:?}", peer.pod_selector))
        .collect();
    assert_eq!(raft_open_to.len(), 1, "{raft_open_to:?}");
    assert!(raft_open_to[0].contains("db-replica") && !raft_open_to[0].contains("web"));
    // The admin token comes from a Secret, mounted read-only.
    for name in ["scaleout-lb", "scaleout-dns"] {
        let d = m
            .deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
            .unwrap();
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let secret = pod
            .volumes
            .iter()
            .flatten()
            .find_map(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone());
        assert_eq!(secret.as_deref(), Some("scaleout-admin"), "{name}");
    }
}

/// A node whose `--join` names itself (a StatefulSet's pod 0, given the
/// same flags as the others) starts the cluster instead of waiting on
/// itself.
#[tokio::test]
async fn a_node_told_to_join_itself_starts_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http = format!("127.0.0.1:{port}");
    let mut node = common::Proc::spawn(&[
        "db",
        "--id",
        "scaleout-db-0",
        "--http",
        &http,
        "--raft",
        "127.0.0.1:0",
        "--data",
        dir.path().to_str().unwrap(),
        "--join",
        &format!("http://{http}"),
    ]);
    node.wait_ready();
    common::eventually(
        std::time::Duration::from_secs(20),
        "it leads its own cluster",
        || async {
            common::client()
                .get(format!("http://{http}/leader"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Three voters given the same `--join` list (a StatefulSet's scheme):
/// the first starts the cluster, the others join it. A voter that comes
/// back with an empty volume — the first one included — joins the
/// cluster it lost instead of starting a second one beside it (split
/// brain), catches up, and the cluster goes on taking writes (its
/// leader does not stop on a follower whose log went backwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_back_with_an_empty_volume_rejoins_its_cluster() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let http: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let raft: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let join = http
        .iter()
        .map(|h| format!("http://{h}"))
        .collect::<Vec<_>>()
        .join(",");
    let start = |i: usize| {
        let id = format!("db-{i}");
        let data = dirs[i].path().join("data");
        let mut p = common::Proc::spawn(&[
            "db",
            "--id",
            &id,
            "--http",
            &http[i],
            "--raft",
            &raft[i],
            "--data",
            data.to_str().unwrap(),
            "--join",
            &join,
        ]);
        p.wait_ready();
        p
    };
    let mut nodes: Vec<common::Proc> = (0..3).map(start).collect();
    let c = common::client();
    let members = |at: String| {
        let c = c.clone();
        async move {
            let r = c.get(format!("http://{at}/nodes")).send().await.ok()?;
            let v: serde_json::Value = r.json().await.ok()?;
            Some(
                v.as_object()?
                    .values()
                    .filter(|n| n["reachable"] == true)
                    .count(),
            )
        }
    };
    common::eventually(std::time::Duration::from_secs(30), "three members", || {
        let asked = members(http[1].clone());
        async move { asked.await == Some(3) }
    })
    .await;
    let write = |n: u32| {
        let c = c.clone();
        let urls: Vec<String> = http.iter().map(|h| format!("http://{h}")).collect();
        async move {
            for url in &urls {
                let r = c
                    .post(format!("{url}/db/execute"))
                    .json(&serde_json::json!([
                        ["CREATE TABLE IF NOT EXISTS t (n INTEGER)"],
                        ["INSERT INTO t VALUES (?)", n]
                    ]))
                    .send()
                    .await;
                let Ok(r) = r else { continue };
                if r.status() != 200 {
                    continue;
                }
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                let done = v["results"]
                    .as_array()
                    .is_some_and(|rs| rs.len() == 2 && rs.iter().all(|r| r.get("error").is_none()));
                if done {
                    return true;
                }
            }
            false
        }
    };
    for n in 0..10 {
        common::eventually(std::time::Duration::from_secs(20), "a write", || write(n)).await;
    }
    // Each voter in turn, the first one too: its volume lost, back empty.
    for i in [0usize, 2] {
        nodes[i].signal(nix::sys::signal::Signal::SIGKILL);
        nodes[i].wait_exit(std::time::Duration::from_secs(10));
        std::fs::remove_dir_all(dirs[i].path().join("data")).unwrap();
        for n in (10 + 10 * i as u32)..(15 + 10 * i as u32) {
            common::eventually(
                std::time::Duration::from_secs(20),
                "a write while it is gone",
                || write(n),
            )
            .await;
        }
        nodes[i] = start(i);
        // It holds everything written, before and while it was gone, and
        // the cluster goes on taking writes.
        let count = |at: String, level: &'static str| {
            let c = c.clone();
            async move {
                let r = c
                    .get(format!(
                        "http://{at}/db/query?level={level}&q=SELECT%20count(*)%20FROM%20t"
                    ))
                    .send()
                    .await
                    .ok()?;
                let v: serde_json::Value = r.json().await.ok()?;
                v["results"][0]["values"][0][0].as_u64()
            }
        };
        let other = http[(i + 1) % 3].clone();
        common::eventually(std::time::Duration::from_secs(30), "it caught up", || {
            let (mine, all) = (
                count(http[i].clone(), "none"),
                count(other.clone(), "strong"),
            );
            async move {
                let (mine, all) = (mine.await, all.await);
                mine.is_some() && mine == all && mine >= Some(15)
            }
        })
        .await;
        common::eventually(std::time::Duration::from_secs(20), "writes go on", || {
            write(900 + i as u32)
        })
        .await;
        assert_eq!(
            members(http[i].clone()).await,
            Some(3),
            "one cluster of three"
        );
    }
    // One cluster: every node names the same leader.
    let mut leaders = std::collections::BTreeSet::new();
    for h in &http {
        let v: serde_json::Value = c
            .get(format!("http://{h}/leader"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        leaders.insert(v["leader"]["id"].to_string());
    }
    assert_eq!(leaders.len(), 1, "{leaders:?}");
}
