# A fleet deployed by Procurator: one control plane and two workers, NixOS
# VMs run by cloud-hypervisor on bare-metal hosts. Every push runs
# `procurator-ctl ci --flake .` (see ci/), which evaluates `blueprintJSON`,
# builds `nixosConfigurations.<machine>.config.system.build.toplevel`,
# publishes the closures and hands them to the control plane; the agents on
# the machines pull and activate them.
{
  description = "Our fleet, deployed by Procurator";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";
    procurator = {
      url = "github:procurator/procurator";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    { nixpkgs, procurator, ... }:
    let
      inherit (procurator.lib) healthCheck;

      # The agents' TLS files. Keep them out of this repository and out of
      # the Nix store: create them with `procurator-ctl pki issue --role agent
      # --name <machine>` and put them on each machine with a secrets tool
      # (agenix, sops-nix) or by hand.
      tls = {
        caFile = "/etc/procurator/tls/ca.crt";
        certFile = "/etc/procurator/tls/agent.crt";
        keyFile = "/etc/procurator/tls/agent.key";
      };

      # Settings every machine shares: a VM that a Procurator VM host runs
      # under cloud-hypervisor (procurator.nixosModules.vm-guest: the host's
      # store over virtiofs, a root in memory, the readiness line the host
      # waits for), with a static address, and the agent, which updates the
      # VM in place when its kernel stays the same.
      common =
        { pkgs, ... }:
        {
          procurator.vmGuest.enable = true;
          boot.initrd.availableKernelModules = [ "virtio_net" ];

          networking.usePredictableInterfaceNames = false;
          networking.defaultGateway = "192.168.1.1";
          networking.nameservers = [ "192.168.1.1" ];

          services.openssh.enable = true;
          # Replace with your operators' keys.
          users.users.root.openssh.authorizedKeys.keys = [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB4fmY0ZbYdEbSlD8oT3AxTrfr4WybDJr+NK1pbmB3Eb ops@example.org"
          ];

          services.procurator-agent = {
            enable = true;
            controlPlane = "https://control-plane-1.fleet.example.org:7700";
            inherit tls;
            substituters = [ "https://cache.example.org" ];
            # The public half of the key CI signs closures with
            # (`nix key convert-secret-to-public < signing-key`). The agent
            # refuses closures signed by anything else.
            trustedPublicKeys = [ "cache.example.org-1:7eyzGgDSmNTMSCuhuloFXPbFADAaclLG0feX9lkfbR4=" ];
            # For the health checks below.
            extraPackages = [
              pkgs.curl
              pkgs.grpcurl
            ];
          };

          system.stateVersion = "25.11";
        };

      # Each machine's address: the control plane and CI reach it there, and
      # it is configured on the machine's only NIC.
      addrs = {
        control-plane-1 = "192.168.1.10";
        worker-1 = "192.168.1.11";
        worker-2 = "192.168.1.12";
      };
      address = addr: {
        networking.interfaces.eth0.ipv4.addresses = [
          {
            address = addr;
            prefixLength = 24;
          }
        ];
      };

      # Every machine must come up with no failed unit.
      systemHealthy = healthCheck {
        command = "systemctl is-system-running --wait";
        timeout = 120;
      };

      # Workers serve a page on port 80; their check asks for it.
      worker =
        addr:
        {
          imports = [ (address addr) ];
          services.nginx = {
            enable = true;
            virtualHosts.default = {
              default = true;
              locations."/healthz".return = "200 ok";
            };
          };
          networking.firewall.allowedTCPPorts = [ 80 ];
        };
      workerHealthy = healthCheck {
        command = "curl -fsS http://localhost/healthz";
        timeout = 60;
        interval = 5;
      };

      # For a control plane that survives the loss of one machine: run it on
      # two or more machines as replicas of one, sharing a PostgreSQL
      # database (on a machine of its own, db-1, configured by
      # `databaseHost`), and give the agents and CI every replica's URL.
      # Import `self.nixosModules.replicaOnPostgres` next to the
      # control-plane module in each replica's configuration.
      replicaOnPostgres = {
        services.procurator-control-plane.database = {
          url = "postgres://procurator@db-1.fleet.example.org/procurator?target_session_attrs=read-write";
          passwordFile = "/run/secrets/procurator-db-password";
          # TLS to the database, its certificate and name checked.
          caFile = "/etc/procurator/db-ca.crt";
        };
      };
      databaseHost =
        { pkgs, ... }:
        {
          services.postgresql = {
            enable = true;
            package = pkgs.postgresql_16;
            enableTCPIP = true;
            ensureDatabases = [ "procurator" ];
            ensureUsers = [
              {
                name = "procurator";
                ensureDBOwnership = true;
              }
            ];
            settings = {
              ssl = true;
              ssl_cert_file = "/etc/postgresql/server.crt";
              ssl_key_file = "/etc/postgresql/server.key";
              # Dead replicas' sessions (and their locks) go within seconds.
              tcp_keepalives_idle = 5;
              tcp_keepalives_interval = 2;
              tcp_keepalives_count = 3;
            };
            # TLS and a password (set with ALTER ROLE … PASSWORD) only.
            authentication = ''
              hostssl procurator procurator 192.168.1.0/24 scram-sha-256
            '';
          };
          networking.firewall.allowedTCPPorts = [ 5432 ];
        };
    in
    procurator.lib.mkCluster {
      nixosSystem = nixpkgs.lib.nixosSystem;
      modules = [
        procurator.nixosModules.agent
        procurator.nixosModules.vm-guest
        common
      ];

      machines = {
        control-plane-1 = {
          role = "control-plane";
          cpu = 2.0;
          memory = {
            amount = 4.0;
            unit = "GB";
          };
          labels = [ "control-plane" ];
          deployment = {
            addr = addrs.control-plane-1;
            backend = "cloud-hypervisor";
            healthChecks = [
              systemHealthy
              # A real gRPC health check, with the agent's own certificate.
              (healthCheck {
                command = "grpcurl -cacert ${tls.caFile} -cert ${tls.certFile} -key ${tls.keyFile} localhost:7700 grpc.health.v1.Health/Check | grep -q '\"SERVING\"'";
                timeout = 60;
                interval = 5;
              })
            ];
          };
          configuration = {
            imports = [
              procurator.nixosModules.control-plane
              (address addrs.control-plane-1)
            ];
            services.procurator-control-plane = {
              enable = true;
              openFirewall = true;
              tls = {
                caFile = "/etc/procurator/tls/ca.crt";
                certFile = "/etc/procurator/tls/control-plane.crt";
                keyFile = "/etc/procurator/tls/control-plane.key";
              };
            };
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
            addr = addrs.worker-1;
            backend = "cloud-hypervisor";
            sshUser = "root";
            sshPort = 22;
            healthChecks = [
              systemHealthy
              workerHealthy
            ];
            autoRollback = true;
          };
          configuration = worker addrs.worker-1;
        };

        worker-2 = {
          role = "worker";
          cpu = 4.0;
          memory = {
            amount = 8.0;
            unit = "GB";
          };
          labels = [
            "worker"
            "compute"
          ];
          deployment = {
            addr = addrs.worker-2;
            backend = "cloud-hypervisor";
            healthChecks = [
              systemHealthy
              workerHealthy
            ];
          };
          configuration = worker addrs.worker-2;
        };
      };
    }
    // {
      nixosModules = { inherit replicaOnPostgres databaseHost; };
    };
}
