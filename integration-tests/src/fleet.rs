//! A whole fleet in one temporary directory: PKI, signing key, fixture
//! flake, binary cache, control plane and one test host per machine with
//! its agent. Dropping it stops the agents, then the control plane, then
//! removes the directory (the mounts were private to the agents'
//! namespaces and went away with them).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::control_plane::ControlPlane;
use crate::ctl::{Ctl, Grpcurl};
use crate::fixture::{self, Closures, Fixture};
use crate::host::{AgentOptions, TestHost};
use crate::netns::{self, NatNetwork};
use crate::nixenv::NixEnv;
use crate::pki::{Pki, SigningKey};

/// How long agents may take to connect (or reconnect after a restart).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// settings.json of the closures the hosts start with.
    pub initial_settings: Value,
    /// Machines whose agent is started (all of them by default).
    pub agents: Vec<String>,
    /// Each host in a network namespace of its own behind a NAT router, the
    /// control plane (and every client) in another ([`NatNetwork`]).
    pub nat: bool,
    /// Machines whose agent runs under a supervisor that restarts it.
    pub supervised: Vec<String>,
    /// Files copied into the fixture flake before anything is built:
    /// (source, path in the flake), e.g. the VM fixture's guest kernel.
    pub flake_files: Vec<(PathBuf, PathBuf)>,
    /// Every agent trusts [`Fleet::intent`] (`--intent-public-key`), and
    /// acts only on artifacts signed with it ([`Fleet::sign`]).
    pub signed: bool,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            initial_settings: json!({ "generation": 0 }),
            agents: crate::MACHINES.iter().map(|m| m.to_string()).collect(),
            nat: false,
            supervised: Vec::new(),
            flake_files: Vec::new(),
            signed: false,
        }
    }
}

// Field order is drop order: agents first, then the control plane, then the
// files.
pub struct Fleet {
    pub hosts: BTreeMap<String, TestHost>,
    pub control_plane: ControlPlane,
    /// Deleted once every process in it has stopped.
    pub network: Option<NatNetwork>,
    pub pki: Pki,
    pub key: SigningKey,
    /// CI's intent key (`nix key generate-secret`, as the cache key).
    pub intent: SigningKey,
    /// Whether agents are started trusting [`Self::intent`].
    pub signed: bool,
    pub fixture: Fixture,
    /// The file:// binary cache the agents pull from.
    pub cache: PathBuf,
    /// The closures the hosts started with.
    pub initial: Closures,
    pub nix: NixEnv,
    dir: TempDir,
}

impl Fleet {
    /// A fleet with every agent connected, each host on its generation-0
    /// closure.
    pub fn start() -> Result<Self> {
        Self::start_with(FleetOptions::default())
    }

    pub fn start_with(opts: FleetOptions) -> Result<Self> {
        let machines: Vec<String> = crate::MACHINES.iter().map(|m| m.to_string()).collect();
        Self::start_from(&crate::fixture_source(), &machines, opts)
    }

    /// A fleet of `machines` built from another fixture flake in `source`
    /// (e.g. [`crate::bench_fixture_source`]), which must define them;
    /// `opts.agents` names the machines whose agent starts. What
    /// [`Fleet::start_with`] does for the fixture fleet's three machines.
    pub fn start_from(
        source: &std::path::Path,
        machines: &[String],
        opts: FleetOptions,
    ) -> Result<Self> {
        crate::require_root()?;
        let dir = tempfile::Builder::new()
            .prefix("procurator-fleet-")
            .tempdir()?;
        let root = dir.path().to_owned();
        let nix = NixEnv::in_dir(&root.join("nix"))?;
        let names: Vec<&str> = machines.iter().map(String::as_str).collect();
        let network = if opts.nat {
            Some(NatNetwork::create(&names)?)
        } else {
            None
        };
        let pki = if network.is_some() {
            Pki::init_with_sans(&nix, &root.join("pki"), &[netns::CONTROL_PLANE_IP])?
        } else {
            Pki::init(&nix, &root.join("pki"))?
        };
        for m in &names {
            pki.issue(&nix, "agent", m)?;
        }
        pki.issue(&nix, "ci", "github")?;
        let key = SigningKey::generate(&nix, &root.join("signing"), "procurator-test-1")?;
        let intent = SigningKey::generate(&nix, &root.join("intent"), "ci-intent-1")?;
        let fixture = Fixture::copy_from(source, &root.join("flake"), machines)?;
        for (from, to) in &opts.flake_files {
            fixture.add_file(from, to)?;
        }
        let initial = fixture.build_with(&nix, &opts.initial_settings)?;
        let control_plane = match &network {
            Some(net) => ControlPlane::start_in(
                &nix,
                &root.join("control-plane"),
                &pki,
                Some(net.control_plane.name()),
                &format!("{}:0", netns::CONTROL_PLANE_IP),
            )?,
            None => ControlPlane::start(&nix, &root.join("control-plane"), &pki)?,
        };
        let mut hosts = BTreeMap::new();
        for &m in &names {
            let mut host = TestHost::create(&nix, &root.join("hosts").join(m), m, &initial[m])?;
            if let Some(net) = &network {
                host.set_netns(net.host(m)?.0.name())?;
            }
            host.set_supervised(opts.supervised.iter().any(|s| s == m));
            host.boot()?;
            hosts.insert(m.to_owned(), host);
        }
        let mut fleet = Self {
            hosts,
            control_plane,
            network,
            pki,
            key,
            intent,
            signed: opts.signed,
            fixture,
            cache: root.join("cache"),
            initial,
            nix,
            dir,
        };
        for m in &opts.agents {
            fleet.start_agent(m)?;
        }
        fleet.wait_connected(&opts.agents)?;
        Ok(fleet)
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn agent_options(&self, machine: &str) -> Result<AgentOptions> {
        Ok(AgentOptions {
            control_plane: self.control_plane.url()?,
            ca: self.pki.ca(),
            identity: Some(self.pki.agent(machine)),
            substituters: vec![format!("file://{}", self.cache.display())],
            trusted_public_keys: vec![self.key.public.clone()],
            extra_args: if self.signed {
                vec!["--intent-public-key".into(), self.intent.public.clone()]
            } else {
                Vec::new()
            },
        })
    }

    pub fn start_agent(&mut self, machine: &str) -> Result<()> {
        self.start_agent_with(machine, &[])
    }

    /// Starts `machine`'s agent with `extra_args` appended to its command
    /// line, e.g. `--vm-host --vm-cpus 2`.
    pub fn start_agent_with(&mut self, machine: &str, extra_args: &[&str]) -> Result<()> {
        let mut opts = self.agent_options(machine)?;
        opts.extra_args
            .extend(extra_args.iter().map(|a| a.to_string()));
        let host = self
            .hosts
            .get_mut(machine)
            .with_context(|| format!("no host {machine}"))?;
        host.start_agent(&self.nix, &opts)
    }

    /// Restarts the control plane with an issuing CA (`pki intermediate`),
    /// so that agents enroll and renew; `extra` goes on its command line too
    /// (e.g. `--agent-cert-validity 90s`).
    pub fn enable_enrollment(&mut self, extra: &[&str]) -> Result<()> {
        let issuing = self.pki.intermediate(&self.nix)?;
        let mut args = vec![
            "--issuing-ca-cert".to_owned(),
            issuing.cert.display().to_string(),
            "--issuing-ca-key".to_owned(),
            issuing.key.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.control_plane.restart_with(&self.nix, &args)
    }

    /// `procurator-ctl enroll-token --name MACHINE --ttl TTL`, the token
    /// (alone on stdout, as documented) saved to a file of the fleet's.
    pub fn join_token(&self, machine: &str, ttl: &str) -> Result<PathBuf> {
        let out = self
            .ctl()?
            .run(&["enroll-token", "--name", machine, "--ttl", ttl])?;
        out.expect_code(0)?;
        let token = out.stdout.trim();
        if !token.starts_with("pjt_") || token.contains(char::is_whitespace) {
            bail!("enroll-token printed more than a token on stdout: {out}");
        }
        if !out
            .stderr
            .contains(&format!("this token enrolls {machine} once"))
        {
            bail!("enroll-token said nothing of what the token is for: {out}");
        }
        let dir = self.dir.path().join("tokens");
        crate::mkdir(&dir)?;
        let path = dir.join(format!("{machine}-{}.token", crate::commit_id()));
        std::fs::write(&path, format!("{token}\n"))?;
        Ok(path)
    }

    /// Starts `machine`'s agent with no certificate, only the join token
    /// in `token`: it enrolls into its state directory.
    pub fn start_enrolling_agent(&mut self, machine: &str, token: &std::path::Path) -> Result<()> {
        let mut opts = self.agent_options(machine)?;
        opts.identity = None;
        opts.extra_args.extend([
            "--join-token".to_owned(),
            token.display().to_string(),
            "--name".to_owned(),
            machine.to_owned(),
        ]);
        let host = self
            .hosts
            .get_mut(machine)
            .with_context(|| format!("no host {machine}"))?;
        host.start_agent(&self.nix, &opts)
    }

    pub fn host(&self, machine: &str) -> &TestHost {
        &self.hosts[machine]
    }

    /// `procurator-ctl` as the operator `pki init` made.
    pub fn ctl(&self) -> Result<Ctl> {
        Ok(Ctl::new(
            &self.nix,
            &self.control_plane.url()?,
            &self.pki.ca(),
            &self.pki.operator(),
        )?
        .in_netns(self.control_plane.netns()))
    }

    pub fn grpcurl(&self) -> Result<Grpcurl> {
        Ok(
            Grpcurl::new(&self.control_plane.host_port()?, &self.pki.ca())?
                .in_netns(self.control_plane.netns()),
        )
    }

    /// `ListAgents` as the operator.
    pub fn agents(&self) -> Result<Vec<Value>> {
        let reply = self.grpcurl()?.call_json(
            &self.pki.operator(),
            "procurator.v1.DeploymentService/ListAgents",
            "{}",
        )?;
        Ok(reply
            .get("agents")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// Waits until the control plane lists every one of `machines` as connected.
    pub fn wait_connected(&mut self, machines: &[String]) -> Result<()> {
        let result = crate::wait_for("the agents to connect", CONNECT_TIMEOUT, || {
            for m in machines {
                if !self.hosts.get_mut(m).is_some_and(TestHost::agent_running) {
                    bail!("{m}'s agent exited:\n{}", self.hosts[m].agent_log());
                }
            }
            let agents = self.agents()?;
            let connected = |m: &String| {
                agents.iter().any(|a| {
                    a.get("machine").and_then(Value::as_str) == Some(m)
                        && a.get("connected").and_then(Value::as_bool) == Some(true)
                })
            };
            Ok(machines.iter().all(connected).then_some(()))
        });
        result.with_context(|| self.logs())
    }

    /// Writes settings.json, builds every machine's closure.
    pub fn build(&self, settings: &Value) -> Result<Closures> {
        self.fixture.build_with(&self.nix, settings)
    }

    /// Publishes closures to the fleet's cache, signed with the fleet's key.
    pub fn publish(&self, closures: &Closures) -> Result<()> {
        fixture::publish(&self.nix, &self.cache, Some(&self.key), closures)
    }

    /// Publishes without signatures: agents must refuse these.
    pub fn publish_unsigned(&self, closures: &Closures) -> Result<()> {
        fixture::publish(&self.nix, &self.cache, None, closures)
    }

    /// Writes deployment.json for `closures` with a fresh commit id; returns
    /// the file and the commit.
    pub fn write_deployment(&self, closures: &Closures) -> Result<(PathBuf, String)> {
        let commit = crate::commit_id();
        let blueprint = self.fixture.blueprint(&self.nix)?;
        let artifact = fixture::deployment(&commit, &blueprint, closures);
        let dir = self.dir.path().join("deployments");
        crate::mkdir(&dir)?;
        let path = dir.join(format!("{commit}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&artifact)?)?;
        Ok((path, commit))
    }

    /// `procurator-ctl sign --intent-key KEY FILE`: signs the artifact in
    /// place with `key` (default: [`Self::intent`]).
    pub fn sign(&self, artifact: &std::path::Path, key: Option<&SigningKey>) -> Result<()> {
        let key = key.unwrap_or(&self.intent);
        let path = artifact.to_str().context("utf-8 path")?;
        let secret = key.secret.to_str().context("utf-8 path")?;
        self.ctl()?
            .run(&["sign", "--intent-key", secret, path])?
            .expect_code(0)?;
        Ok(())
    }

    /// Builds, publishes (signed) and writes the artifact.
    pub fn prepare(&self, settings: &Value) -> Result<(Closures, PathBuf, String)> {
        let closures = self.build(settings)?;
        self.publish(&closures)?;
        let (path, commit) = self.write_deployment(&closures)?;
        Ok((closures, path, commit))
    }

    /// The deployment of `commit`, with its rows.
    pub fn deployment_by_commit(&self, commit: &str) -> Result<Value> {
        let reply = self.grpcurl()?.call_json(
            &self.pki.operator(),
            "procurator.v1.DeploymentService/ListDeployments",
            "{}",
        )?;
        reply
            .get("deployments")
            .and_then(Value::as_array)
            .and_then(|ds| {
                ds.iter()
                    .find(|d| d.get("gitCommit").and_then(Value::as_str) == Some(commit))
            })
            .cloned()
            .with_context(|| format!("no deployment of commit {commit} in {reply}"))
            .and_then(|d| self.with_rows(d))
    }

    /// `deployment`, a summary as GetDeployment or ListDeployments returns
    /// it, with every row that `ListMachines` pages.
    pub fn with_rows(&self, mut deployment: Value) -> Result<Value> {
        let id = deployment["id"]
            .as_str()
            .with_context(|| format!("a deployment without an id: {deployment}"))?
            .to_owned();
        let grpcurl = self.grpcurl()?;
        let mut rows = Vec::new();
        let mut token = String::new();
        loop {
            let request =
                serde_json::json!({ "deploymentId": id, "pageSize": 1000, "pageToken": token });
            let reply = grpcurl.call_json(
                &self.pki.operator(),
                "procurator.v1.DeploymentService/ListMachines",
                &request.to_string(),
            )?;
            rows.extend(reply["machines"].as_array().into_iter().flatten().cloned());
            match reply.get("nextPageToken").and_then(Value::as_str) {
                Some(next) if !next.is_empty() => token = next.to_owned(),
                _ => break,
            }
        }
        deployment["machines"] = Value::Array(rows);
        Ok(deployment)
    }

    /// The id of the deployment of `commit`.
    pub fn deployment_id(&self, commit: &str) -> Result<String> {
        let deployment = self.deployment_by_commit(commit)?;
        deployment["id"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("a deployment without an id: {deployment}"))
    }

    /// Machine name -> its status object in a `Deployment`.
    pub fn machine_states(deployment: &Value) -> BTreeMap<String, Value> {
        deployment
            .get("machines")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| Some((m.get("machine")?.as_str()?.to_owned(), m.clone())))
            .collect()
    }

    /// The tail of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = format!(
            "=== control plane ({})\n{}\n",
            self.control_plane.log_path().display(),
            crate::log_tail(&self.control_plane.log_path(), 60)
        );
        for (m, host) in &self.hosts {
            if let Some(path) = host.agent_log_path() {
                out.push_str(&format!(
                    "=== agent of {m}\n{}\n",
                    crate::log_tail(path, 60)
                ));
            }
            for run in host.supervised_logs() {
                out.push_str(&format!(
                    "=== agent of {m}, {}\n{}\n",
                    run.display(),
                    crate::log_tail(&run, 40)
                ));
            }
        }
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "fleet in {} failed; logs:\n{}",
                self.dir.path().display(),
                self.logs()
            );
        }
        if std::env::var_os("PROCURATOR_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
    }
}
