//! How the chaos run reaches the servers it checks. On this machine's
//! loopback, as they are; in a Compose project, by the names its nodes
//! advertise (`db-1:4001`), which only the project's networks resolve:
//! here each is the container's current address, asked of the engine (a
//! container started again may have another).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compose::Compose;

/// How long an address the engine gave is used before asking again.
const KEPT: Duration = Duration::from_secs(1);

/// The chaos run's way to its servers.
#[derive(Clone, Default)]
pub struct Reach {
    names: Option<Arc<ContainerNames>>,
}

impl Reach {
    /// Servers on this machine, by their URLs.
    pub fn local() -> Reach {
        Reach { names: None }
    }

    /// A Compose project's servers, by their service names.
    pub fn compose(project: Compose) -> Reach {
        Reach {
            names: Some(Arc::new(ContainerNames {
                project,
                seen: Arc::new(tokio::sync::Mutex::new((BTreeMap::new(), None))),
            })),
        }
    }

    /// The run's HTTP client: every call bounded by 10 s, no redirects
    /// followed. A builder that fails is an error, never a default client
    /// without the timeout.
    pub fn http(&self) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(names) = &self.names {
            builder = builder.dns_resolver(names.clone());
        }
        builder
            .build()
            .map_err(|e| format!("building the chaos run's HTTP client: {e}"))
    }

    /// A database client for the cluster `dbs` belong to.
    pub fn db(
        &self,
        dbs: Vec<String>,
    ) -> Result<scaleout_client::Client, scaleout_client::ClientError> {
        match &self.names {
            Some(names) => scaleout_client::Client::with_resolver(dbs, names.clone()),
            None => scaleout_client::Client::new(dbs),
        }
    }
}

/// A Compose project's service names → its containers' addresses.
pub struct ContainerNames {
    project: Compose,
    /// The last answer and when it was had; one lookup at a time.
    seen: Arc<tokio::sync::Mutex<Seen>>,
}

/// Every service's address, and when the engine gave them.
type Seen = (BTreeMap<String, IpAddr>, Option<Instant>);

impl reqwest::dns::Resolve for ContainerNames {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_string();
        let (project, seen) = (self.project.clone(), self.seen.clone());
        Box::pin(async move {
            let ip = {
                let mut seen = seen.lock().await;
                let fresh = seen.1.is_some_and(|at| at.elapsed() < KEPT);
                if !fresh {
                    let asked = project.clone();
                    if let Ok(Ok(all)) =
                        tokio::task::spawn_blocking(move || asked.addresses()).await
                    {
                        *seen = (all, Some(Instant::now()));
                    }
                }
                seen.0.get(&name).copied()
            };
            let addrs: Vec<SocketAddr> = match ip {
                Some(ip) => vec![SocketAddr::new(ip, 0)],
                // Not one of the project's services: the system's answer.
                None => tokio::net::lookup_host((name.as_str(), 0)).await?.collect(),
            };
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}
