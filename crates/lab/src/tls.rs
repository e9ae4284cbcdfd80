//! `scaleout up --tls`: a CA made for the lab, and a certificate per
//! process, so every hop (client → lb → web → db, db ↔ db) runs over TLS,
//! mutual where the receiving side only takes its own tier's callers.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use scaleout_tls::LocalCa;

use crate::Error;

pub struct LabTls {
    dir: PathBuf,
    ca: LocalCa,
    names: Vec<String>,
}

/// A process's certificate and key files.
pub struct Files {
    pub cert: String,
    pub key: String,
}

impl LabTls {
    /// A new CA in `dir` (`ca.pem`); certificates name every address and
    /// name a lab uses.
    pub fn new(dir: &Path, host: IpAddr) -> Result<Self, Error> {
        let fail = |e: &dyn std::fmt::Display| Error::Spawn {
            name: "the lab's TLS certificates".into(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        let ca = LocalCa::new("scaleout lab CA").map_err(|e| fail(&e))?;
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).map_err(|e| fail(&e))?;
        let mut names: Vec<String> = vec![
            "localhost".into(),
            crate::SITE_NAME.into(),
            "127.0.0.1".into(),
            host.to_string(),
        ];
        names.extend(crate::LB_ADDRS.iter().map(|a| a.to_string()));
        names.dedup();
        Ok(LabTls {
            dir: dir.to_path_buf(),
            ca,
            names,
        })
    }

    pub fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    /// `who`'s certificate (made on first ask).
    pub fn issue(&self, who: &str) -> Result<Files, Error> {
        let fail = |e: &dyn std::fmt::Display| Error::Spawn {
            name: who.into(),
            reason: format!("TLS certificate: {e}"),
        };
        let cert = self.dir.join(format!("{who}.pem"));
        let key = self.dir.join(format!("{who}-key.pem"));
        let issued = self.ca.issue(&self.names).map_err(|e| fail(&e))?;
        std::fs::write(&cert, issued.cert_pem).map_err(|e| fail(&e))?;
        write_private(&key, &issued.key_pem).map_err(|e| fail(&e))?;
        Ok(Files {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
        })
    }

    /// A client of the lab's processes (the lab itself, waiting for them).
    pub fn client(&self) -> Result<reqwest::Client, Error> {
        let config = scaleout_tls::ClientTls {
            ca: Some(self.ca().into()),
            cert: None,
            key: None,
        }
        .config()
        .map_err(|e| Error::Spawn {
            name: "the lab's TLS client".into(),
            reason: e.to_string(),
        })?;
        reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .map_err(|e| Error::Spawn {
                name: "the lab's TLS client".into(),
                reason: e.to_string(),
            })
    }
}

/// A key file only its owner reads.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}
