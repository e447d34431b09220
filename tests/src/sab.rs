//! A running SAB (`seb-agent sab serve`) for a sandboxed broker: its CAs, policies,
//! configuration and log under the sandbox's directory, its API on a loopback port.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use seb_agent::sab::{client::SabClient, pki};
use serde_json::Value;

use crate::Sandbox;

pub struct Sab {
    pub dir: PathBuf,
    pub policies: PathBuf,
    pub config: PathBuf,
    pub database: PathBuf,
    pub signing_key: PathBuf,
    pub url: String,
    pub node: String,
    agent: PathBuf,
    /// Cluster mode: the SAB runs in the sandbox's namespace (where the API server is).
    cluster: Option<InCluster>,
    child: Option<Child>,
    runtime: tokio::runtime::Runtime,
}

struct InCluster {
    probe: PathBuf,
    cgroup: PathBuf,
    netns: String,
    kubeconfig: PathBuf,
}

impl Sab {
    /// Start a SAB for the sandbox's broker (node `node`), with `policies` as `policy.cedar`
    /// and `extra` TOML lines at the top of its configuration. Its issuing CA must be one
    /// the broker trusts: it is created in `issuing_dir` (`sab-ca.pem`, `sab-ca.key`) unless there.
    pub fn start(sandbox: &Sandbox, issuing_dir: &Path, policies: &str, extra: &str) -> Result<Self> {
        Self::start_in(sandbox, issuing_dir, policies, extra, None)
    }

    /// The same in cluster mode, in the sandbox's namespace (exempt cgroup), with this kubeconfig.
    pub fn start_cluster(sandbox: &Sandbox, issuing_dir: &Path, policies: &str, kubeconfig: &Path) -> Result<Self> {
        let cluster = InCluster {
            probe: sandbox.tools.probe.clone(),
            cgroup: sandbox.cgroup.join("exempt"),
            netns: sandbox.netns.clone(),
            kubeconfig: kubeconfig.to_path_buf(),
        };
        Self::start_in(sandbox, issuing_dir, policies, "", Some(cluster))
    }

    fn start_in(
        sandbox: &Sandbox,
        issuing_dir: &Path,
        policies: &str,
        extra: &str,
        cluster: Option<InCluster>,
    ) -> Result<Self> {
        let dir = sandbox.dir.join(format!("sab-{}", uuid_like()));
        std::fs::create_dir_all(dir.join("policies"))?;
        pki::init(&pki::Layout::new(&dir), &["127.0.0.1".into()])?;
        let policy_dir = dir.join("policies");
        std::fs::write(policy_dir.join("policy.cedar"), policies)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let (database, signing_key) = (dir.join("sab.db"), dir.join("sab.key"));
        let node = crate::NODE_NAME;
        let config = dir.join("sab.toml");
        let mode = match &cluster {
            None => format!("[node]\nname = \"{node}\"\nbroker_socket = \"{}\"\n", sandbox.socket.display()),
            Some(_) => "[cluster]\npolicy = \"default\"\nrevocation = \"default\"\n".to_string(),
        };
        std::fs::write(
            &config,
            format!(
                "{extra}\nlisten = \"127.0.0.1:{port}\"\npolicies = \"{}\"\nreload_interval_ms = 100\n\n\
                 [tls]\ncertificate = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n\n\
                 [issuer]\nca_cert = \"{}\"\nca_key = \"{}\"\n\n\
                 [audit]\ndatabase = \"{}\"\nsigning_key = \"{}\"\n\n{mode}",
                policy_dir.display(),
                dir.join("server.pem").display(),
                dir.join("server.key").display(),
                dir.join("tls-ca.pem").display(),
                issuing_dir.join("sab-ca.pem").display(),
                issuing_dir.join("sab-ca.key").display(),
                database.display(),
                signing_key.display(),
            ),
        )?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let mut sab = Self {
            dir,
            policies: policy_dir,
            config,
            database,
            signing_key,
            url: format!("https://127.0.0.1:{port}"),
            node: node.to_string(),
            agent: sandbox.tools.agent.clone(),
            cluster,
            child: None,
            runtime,
        };
        sab.launch()?;
        Ok(sab)
    }

    /// Run `sab serve` and wait until its health endpoint answers.
    pub fn launch(&mut self) -> Result<()> {
        let mut command = match &self.cluster {
            None => Command::new(&self.agent),
            Some(cluster) => {
                let mut command = Command::new(&cluster.probe);
                command.arg("--cgroup").arg(&cluster.cgroup).args(["--netns", &cluster.netns, "exec", "--"]);
                command.arg(&self.agent).env("KUBECONFIG", &cluster.kubeconfig);
                command
            }
        };
        let child = command
            .args(["sab", "serve", "--config"])
            .arg(&self.config)
            .env("SEB_LOG_FORMAT", "json")
            .stderr(Stdio::from(std::fs::File::create(self.dir.join("sab.log"))?))
            .spawn()?;
        self.child = Some(child);
        let probe = self.identity_cert("seb://approver/health-probe")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().expect("started").try_wait()? {
                bail!("the SAB exited with {status}: {}", self.log());
            }
            if let Ok((200, _)) = self.call_as(&probe, "GET", "/v1/healthz", None) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the SAB did not answer within 20 s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM the SAB and wait.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
            child.wait()?;
        }
        Ok(())
    }

    /// What the SAB logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sab.log")).unwrap_or_default()
    }

    /// A client certificate naming `identity`; returns the path prefix of its files.
    pub fn identity_cert(&self, identity: &str) -> Result<PathBuf> {
        let name: String = identity.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let out = self.dir.join(format!("client-{name}"));
        pki::client_certificate(&pki::Layout::new(&self.dir).tls_ca(), identity, Duration::from_secs(3600), &out)?;
        Ok(out)
    }

    /// The agent identity of a cgroup of the sandbox on this SAB's node.
    pub fn agent_identity(&self, sandbox: &Sandbox, cgroup: &str) -> String {
        format!("seb://node/{}/cgroup/{}/{cgroup}", self.node, sandbox.cgroup_relative.trim_start_matches('/'))
    }

    pub fn client(&self, cert: &Path) -> Result<SabClient> {
        SabClient::new(
            &self.url,
            &cert.with_extension("pem"),
            &cert.with_extension("key"),
            &self.dir.join("tls-ca.pem"),
        )
    }

    /// One API call as the holder of `cert` (from [`Self::identity_cert`]).
    pub fn call_as(&self, cert: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        self.call_with(self.client(cert)?, method, path, body)
    }

    /// One call with `client`, from the SAB's network namespace when it has its own.
    fn call_with(&self, client: SabClient, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let Some(cluster) = &self.cluster else {
            return self.runtime.block_on(client.call(method, path, body)).context("calling the SAB");
        };
        let (method, path, body) = (method.to_string(), path.to_string(), body.cloned());
        crate::moto::in_netns(&cluster.netns, move || async move { client.call(&method, &path, body.as_ref()).await })
            .context("calling the SAB")
    }

    /// As `call`, also presenting `token` as a bearer token (cluster mode).
    pub fn call_with_token(
        &self,
        identity: &str,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let cert = self.identity_cert(identity).expect("a client certificate");
        // From a file, as a pod's projected token is read (and as `seb-agent mcp` reads it).
        let file = self.dir.join(format!("token-{}", uuid_like()));
        std::fs::write(&file, format!("{token}\n")).expect("writing the token file");
        let client = self.client(&cert).expect("a client").with_bearer_file(&file);
        self.call_with(client, method, path, body).expect("the SAB answers")
    }

    /// As `call_as`, for `identity` (a certificate is made for it if needed).
    pub fn call(&self, identity: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let cert = self.identity_cert(identity).expect("a client certificate");
        self.call_as(&cert, method, path, body).expect("the SAB answers")
    }

    /// The SAB CLI (`seb-agent sab <args>`) as `identity`, JSON output.
    pub fn cli(&self, identity: &str, args: &[&str]) -> (i32, Value) {
        let cert = self.identity_cert(identity).expect("a client certificate");
        let output = Command::new(&self.agent)
            .arg("--json")
            .arg("sab")
            .args(args)
            .env("SEB_SAB_URL", &self.url)
            .env("SEB_SAB_CERT", cert.with_extension("pem"))
            .env("SEB_SAB_KEY", cert.with_extension("key"))
            .env("SEB_SAB_CA", self.dir.join("tls-ca.pem"))
            .output()
            .expect("running seb-agent sab");
        let value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
            Value::String(format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        });
        (output.status.code().unwrap_or(-1), value)
    }

    /// Write a policy file (name ends in `.cedar`) and wait until the SAB's epoch moves past `from`.
    pub fn write_policy(&self, name: &str, text: &str, from: u64) -> Result<u64> {
        std::fs::write(self.policies.join(name), text)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, health) = self.call("seb://approver/health-probe", "GET", "/v1/healthz", None);
            let epoch = health["policy_epoch"].as_u64().unwrap_or(0);
            if epoch > from {
                return Ok(epoch);
            }
            if Instant::now() > deadline {
                bail!("the SAB's epoch stayed {epoch} after writing {name}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sab {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
