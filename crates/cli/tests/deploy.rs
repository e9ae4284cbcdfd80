//! The systemd units in `deploy/systemd/`: each runs the role its name
//! says, hardened (a dynamic user, a read-only system, no privileges but
//! the one a port below 1024 needs), with an example environment file
//! whose flags this binary takes; and `systemd-analyze` verifies them and
//! rates their exposure, where it is installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_scaleout");

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd")
}

/// A unit's `[Service]` section: key to values (a key may repeat).
fn service_section(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut section = String::new();
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section == "[Service]" {
            let (k, v) = line.split_once('=').expect("key=value");
            keys.entry(k.into()).or_default().push(v.into());
        }
    }
    keys
}

fn one<'a>(keys: &'a BTreeMap<String, Vec<String>>, key: &str, unit: &str) -> &'a str {
    keys.get(key)
        .and_then(|v| v.last())
        .unwrap_or_else(|| panic!("{unit}: no {key}="))
}

#[test]
fn every_unit_runs_its_role_hardened_with_flags_this_binary_takes() {
    let mut units: Vec<PathBuf> = std::fs::read_dir(systemd_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    units.sort();
    let names: Vec<String> = units
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "scaleout-db@.service",
            "scaleout-dns.service",
            "scaleout-lb@.service",
            "scaleout-web@.service"
        ]
    );
    for unit in &units {
        let name = unit.file_name().unwrap().to_string_lossy().into_owned();
        let role = name
            .trim_start_matches("scaleout-")
            .trim_end_matches(".service")
            .trim_end_matches('@')
            .to_string();
        let keys = service_section(&std::fs::read_to_string(unit).unwrap());
        for (key, want) in [
            ("DynamicUser", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("NoNewPrivileges", "yes"),
            ("PrivateTmp", "yes"),
            ("KillSignal", "SIGTERM"),
        ] {
            assert_eq!(one(&keys, key, &name), want, "{name}: {key}");
        }
        let caps = one(&keys, "CapabilityBoundingSet", &name);
        assert!(
            caps.is_empty() || caps == "CAP_NET_BIND_SERVICE",
            "{name}: capabilities {caps:?}"
        );
        let exec = one(&keys, "ExecStart", &name);
        let prefix = format!("/usr/local/bin/scaleout {role} ");
        assert!(exec.starts_with(&prefix), "{name}: {exec}");
        if role == "db" {
            assert_eq!(one(&keys, "StateDirectory", &name), "scaleout-db-%i");
            assert!(exec.contains("--data /var/lib/scaleout-db-%i"), "{exec}");
        }
        // Its environment file, with an example for instance 1, whose
        // flags (with the unit's own) this binary takes.
        let env_file = one(&keys, "EnvironmentFile", &name).replace("%i", "1");
        let example = systemd_dir()
            .join("env")
            .join(Path::new(&env_file).file_name().unwrap());
        let text = std::fs::read_to_string(&example)
            .unwrap_or_else(|e| panic!("{name}: no example {}: {e}", example.display()));
        let var = format!("SCALEOUT_{}_ARGS", role.to_uppercase());
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{var}=")))
            .unwrap_or_else(|| panic!("{}: no {var}=", example.display()));
        assert!(exec.ends_with(&format!("${var}")), "{name}: {exec}");
        let fixed = exec[prefix.len()..]
            .trim_end_matches(&format!("${var}"))
            .replace("%i", "1");
        let args: Vec<&str> = fixed
            .split_whitespace()
            .chain(line.split_whitespace())
            .collect();
        let out = Command::new(BIN)
            .arg(&role)
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: scaleout {role} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `systemd-analyze verify` finds nothing to say of any unit (its
/// command pointed at this binary), and `security` rates each exposure
/// low (the scale goes from 0, best, to 10).
#[test]
fn systemd_verifies_the_units_and_rates_their_exposure_low() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED: systemd-analyze is not installed here");
        return;
    };
    assert!(version.status.success());
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(systemd_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "service") {
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("/usr/local/bin/scaleout", BIN);
            std::fs::write(dir.path().join(path.file_name().unwrap()), text).unwrap();
        }
    }
    for unit in [
        "scaleout-db@1.service",
        "scaleout-web@1.service",
        "scaleout-lb@1.service",
        "scaleout-dns.service",
    ] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(unit)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{unit}: {said}"
        );
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", unit])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        let level: f64 = said
            .lines()
            .find_map(|l| {
                l.split_once("Overall exposure level for ")?
                    .1
                    .split_once(": ")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{unit}: no exposure level: {said}"));
        assert!(level <= 3.0, "{unit}: exposure {level}");
    }
}
