# The seed's three machines, described the way a user would, for the tests
# in run.sh. `nixosSystem` defaults to the fake; run.sh also passes one that
# throws, to prove the blueprint never evaluates NixOS, and the flake's own
# `lib` as `procurator`.
{
  nixosSystem ? import ./fake-nixos-system.nix,
  procurator ? import ../lib.nix,
}:
let
  inherit (procurator) healthCheck;
in
procurator.mkCluster {
  inherit nixosSystem;
  specialArgs.fleet = "test";
  modules = [ { procuratorTest.marker = "common"; } ];
  machines = {
    control-plane-1 = {
      role = "control-plane";
      cpu = 2;
      memory = {
        amount = 2;
        unit = "GiB";
      };
      labels = [ "control-plane" ];
      deployment = {
        addr = "192.168.1.10";
        backend = "cloud-hypervisor";
        # No interval and no enabled: the blueprint fills them in.
        healthChecks = [
          {
            command = "systemctl is-active procurator-control-plane.service";
            timeout = 30;
          }
        ];
      };
      configuration = {
        procuratorTest.marker = "control-plane-1";
      };
    };

    worker-1 = {
      role = "worker";
      cpu = 2.0;
      memory = {
        amount = 2.0;
        unit = "GB";
      };
      labels = [
        "worker"
        "compute"
      ];
      replicas = 1;
      deployment = {
        addr = "192.168.1.11";
        backend = "cloud-hypervisor";
        sshUser = "root";
        sshPort = 22;
        healthChecks = [
          {
            enabled = true;
            command = "systemctl is-system-running --wait";
            timeout = 60;
            interval = 10;
          }
        ];
        autoRollback = true;
      };
      configuration = {
        procuratorTest.marker = "worker-1";
      };
    };

    # Everything optional left out, and a few set to something else.
    worker-2 = {
      role = "worker";
      cpu = 0.5;
      memory = {
        amount = 512;
        unit = "MiB";
      };
      replicas = 3;
      deployment = {
        addr = "worker-2.example.org";
        backend = "cloud-hypervisor";
        sshUser = "deploy";
        sshPort = 2222;
        healthChecks = [
          (healthCheck {
            command = "curl -fsS http://localhost:8080/healthz";
            timeout = 120;
            interval = 5;
            enabled = false;
          })
        ];
        autoRollback = false;
      };
      configuration = {
        procuratorTest.marker = "worker-2";
      };
    };
  };
}
