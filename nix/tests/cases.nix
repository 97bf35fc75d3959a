# What must fail, and with what message. run.sh evaluates each case's
# `value` (strictly) and expects an error whose text contains `message`.
let
  procurator = import ../lib.nix;
  stub = import ./stub-nixos.nix;
  fakeNixos = import ./fake-nixos-system.nix;

  valid = {
    role = "worker";
    cpu = 2;
    memory = {
      amount = 2;
      unit = "GB";
    };
    deployment = {
      addr = "192.168.1.11";
      backend = "cloud-hypervisor";
      healthChecks = [
        {
          command = "true";
          timeout = 5;
        }
      ];
    };
    configuration = { };
  };

  # The blueprint of a cluster of one machine, `w-1`, changed by `change`.
  blueprintOf = machines: (procurator.mkCluster { inherit machines; }).blueprintJSON;
  with1 = change: blueprintOf { w-1 = change valid; };
  withDeployment =
    change: with1 (machine: machine // { deployment = change machine.deployment; });
  withCheck =
    change:
    withDeployment (
      deployment: deployment // { healthChecks = [ (change (builtins.head deployment.healthChecks)) ]; }
    );
  without = names: attrs: builtins.removeAttrs attrs names;

  # The agent module's config, with its settings changed by `change`.
  agentModule =
    change:
    (stub.evalModule {
      module = ../modules/agent.nix;
      settings.services.procurator-agent = change {
        enable = true;
        package = {
          outPath = "/nix/store/00000000000000000000000000000000-procurator-agent";
        };
        controlPlane = "https://cp:7700";
        tls = {
          caFile = "/etc/procurator/ca.crt";
          certFile = "/etc/procurator/agent.crt";
          keyFile = "/etc/procurator/agent.key";
        };
      };
      config.nix.package = {
        outPath = "/nix/store/00000000000000000000000000000000-nix";
      };
      pkgs.bash = {
        outPath = "/nix/store/00000000000000000000000000000000-bash";
      };
    }).config;
  withKey = keyFile: settings: settings // { tls = settings.tls // { inherit keyFile; }; };
in
{
  # The cluster as a whole.
  no-machines = {
    value = blueprintOf { };
    message = "machines: no machine is defined";
  };
  machines-not-attrs = {
    value = blueprintOf [ valid ];
    message = "machines: expected an attribute set of machines, got list";
  };

  # Machine names, as procurator_core::names::MachineName takes them.
  name-starts-with-dash = {
    value = blueprintOf { "-w" = valid; };
    message = ''machines."-w": not a valid machine name'';
  };
  name-with-dot = {
    value = blueprintOf { "w.1" = valid; };
    message = ''machines."w.1": not a valid machine name'';
  };
  name-with-space = {
    value = blueprintOf { "w 1" = valid; };
    message = ''machines."w 1": not a valid machine name'';
  };
  name-too-long = {
    value = blueprintOf { "a123456789b123456789c123456789d123456789e123456789f123456789xyzw" = valid; };
    message = "not a valid machine name: use 1 to 63 characters";
  };

  # A machine's keys.
  machine-unknown-key = {
    value = with1 (m: m // { rol = "worker"; });
    message = ''machines.w-1: unknown key "rol"; allowed: "role", "cpu"'';
  };
  machine-not-attrs = {
    value = blueprintOf { w-1 = "worker"; };
    message = "machines.w-1: expected an attribute set { role, cpu, memory, deployment, configuration, ... }, got string \"worker\"";
  };
  missing-role = {
    value = with1 (without [ "role" ]);
    message = "machines.w-1.role: missing";
  };
  empty-role = {
    value = with1 (m: m // { role = " "; });
    message = "machines.w-1.role: expected a non-empty string, got string \" \"";
  };
  missing-cpu = {
    value = with1 (without [ "cpu" ]);
    message = "machines.w-1.cpu: missing";
  };
  zero-cpu = {
    value = with1 (m: m // { cpu = 0; });
    message = "machines.w-1.cpu: expected a positive number, got int 0";
  };
  cpu-as-string = {
    value = with1 (m: m // { cpu = "2"; });
    message = "machines.w-1.cpu: expected a positive number, got string \"2\"";
  };
  missing-memory = {
    value = with1 (without [ "memory" ]);
    message = "machines.w-1.memory: missing";
  };
  memory-as-number = {
    value = with1 (m: m // { memory = 2; });
    message = "machines.w-1.memory: expected an attribute set { amount, unit }";
  };
  memory-unknown-unit = {
    value = with1 (m: m // { memory = m.memory // { unit = "Gb"; }; });
    message = ''machines.w-1.memory.unit: expected one of "MB", "GB", "TB", "MiB", "GiB", "TiB", got string "Gb"'';
  };
  memory-missing-amount = {
    value = with1 (m: m // { memory.unit = "GB"; });
    message = "machines.w-1.memory.amount: missing";
  };
  labels-not-list = {
    value = with1 (m: m // { labels = "worker"; });
    message = "machines.w-1.labels: expected a list, got string";
  };
  label-not-string = {
    value = with1 (m: m // { labels = [ "worker" 1 ]; });
    message = "machines.w-1.labels[1]: expected a non-empty string, got int 1";
  };
  negative-replicas = {
    value = with1 (m: m // { replicas = -1; });
    message = "machines.w-1.replicas: expected a whole number from 1 to 4294967295, got int -1";
  };
  zero-replicas = {
    value = with1 (m: m // { replicas = 0; });
    message = "machines.w-1.replicas: expected a whole number from 1 to 4294967295, got int 0";
  };

  # deployment.
  missing-deployment = {
    value = with1 (without [ "deployment" ]);
    message = "machines.w-1.deployment: missing";
  };
  missing-addr = {
    value = withDeployment (without [ "addr" ]);
    message = "machines.w-1.deployment.addr: missing; the address the machine is reached at";
  };
  missing-backend = {
    value = withDeployment (without [ "backend" ]);
    message = "machines.w-1.deployment.backend: missing";
  };
  deployment-unknown-key = {
    value = withDeployment (d: d // { ssh_port = 22; });
    message = ''machines.w-1.deployment: unknown key "ssh_port"'';
  };
  ssh-port-out-of-range = {
    value = withDeployment (d: d // { sshPort = 70000; });
    message = "machines.w-1.deployment.sshPort: expected a whole number from 1 to 65535, got int 70000";
  };
  auto-rollback-not-bool = {
    value = withDeployment (d: d // { autoRollback = "yes"; });
    message = "machines.w-1.deployment.autoRollback: expected true or false";
  };
  health-checks-not-list = {
    value = withDeployment (d: d // { healthChecks = { command = "true"; }; });
    message = "machines.w-1.deployment.healthChecks: expected a list, got set";
  };

  # Health checks.
  check-unknown-key = {
    value = withCheck (c: c // { retries = 3; });
    message = ''machines.w-1.deployment.healthChecks[0]: unknown key "retries"'';
  };
  check-missing-command = {
    value = withCheck (without [ "command" ]);
    message = "machines.w-1.deployment.healthChecks[0].command: missing";
  };
  check-missing-timeout = {
    value = withCheck (without [ "timeout" ]);
    message = "machines.w-1.deployment.healthChecks[0].timeout: missing";
  };
  check-fractional-interval = {
    value = withCheck (c: c // { interval = 2.5; });
    message = "machines.w-1.deployment.healthChecks[0].interval: expected a whole number from 1 to 86400, got float 2.5";
  };
  check-zero-timeout = {
    value = withCheck (c: c // { timeout = 0; });
    message = "machines.w-1.deployment.healthChecks[0].timeout: expected a whole number from 1 to 86400";
  };
  check-enabled-not-bool = {
    value = withCheck (c: c // { enabled = 1; });
    message = "machines.w-1.deployment.healthChecks[0].enabled: expected true or false";
  };

  # nixosConfigurations.
  no-nixos-system = {
    value = (procurator.mkCluster { machines.w-1 = valid; }).nixosConfigurations.w-1;
    message = ''nixosSystem: not given, so machine "w-1" cannot be built; pass nixosSystem = nixpkgs.lib.nixosSystem'';
  };
  missing-configuration = {
    value =
      (procurator.mkCluster {
        nixosSystem = fakeNixos;
        machines.w-1 = without [ "configuration" ] valid;
      }).nixosConfigurations.w-1.config.system.build.toplevel.outPath;
    message = "machines.w-1.configuration: missing; the machine's NixOS module";
  };
  # A machine is not built from an entry the blueprint refuses.
  build-checks-the-entry = {
    value =
      (procurator.mkCluster {
        nixosSystem = fakeNixos;
        machines.w-1 = without [ "role" ] valid;
      }).nixosConfigurations.w-1.config.system.build.toplevel.outPath;
    message = "machines.w-1.role: missing";
  };

  # The modules' option types.
  agent-plain-http = {
    value = agentModule (s: s // { controlPlane = "http://cp:7700"; });
    message = "The option `services.procurator-agent.controlPlane' is not of type `string matching the pattern https://";
  };
  agent-key-in-store = {
    value = agentModule (withKey "/nix/store/00000000000000000000000000000000-agent.key");
    message = "The option `services.procurator-agent.tls.keyFile' is not of type `null or absolute path outside the Nix store'";
  };
  # Interpolating a path literal would copy the key into the store.
  agent-key-as-path = {
    value = agentModule (withKey ./cases.nix);
    message = "The option `services.procurator-agent.tls.keyFile' is not of type `null or absolute path outside the Nix store'";
  };
  agent-bad-public-key = {
    value = agentModule (s: s // { trustedPublicKeys = [ "cache.example.org-1" ]; });
    message = "The option `services.procurator-agent.trustedPublicKeys' is not of type";
  };
  agent-bad-intent-key = {
    value = agentModule (s: s // { intentPublicKeys = [ "ci-intent-1:notbase64" ]; });
    message = "The option `services.procurator-agent.intentPublicKeys' is not of type";
  };
  agent-substituter-with-space = {
    value = agentModule (s: s // { substituters = [ "https://cache.example.org extra" ]; });
    message = "The option `services.procurator-agent.substituters' is not of type";
  };
  agent-without-control-plane = {
    value = agentModule (without [ "controlPlane" ]);
    message = "The option `services.procurator-agent.controlPlane' is used but not defined.";
  };
}
