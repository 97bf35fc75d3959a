# services.procurator-agent: dials out to the control plane, pulls the
# closure this machine should run from a binary cache, activates it behind
# health checks and rolls back on failure (flags as docs/interfaces.md says).
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.services.procurator-agent;

  inherit (import ./types.nix lib) secretPath vmm;

  # What `procurator-agent --substituter` and `nix copy --from` accept.
  storeUri = lib.types.strMatching "(/|[A-Za-z][A-Za-z0-9+.-]*://)[^[:space:]]+";

  # `nix key convert-secret-to-public` output: NAME:BASE64 of an ed25519 key.
  publicKey = lib.types.strMatching "[^:[:space:]]+:[A-Za-z0-9+/=]{44}";
in
{
  options.services.procurator-agent = {
    enable = lib.mkEnableOption "the Procurator agent, which deploys the closures the control plane assigns to this machine";

    package = lib.mkOption {
      type = lib.types.package;
      defaultText = lib.literalExpression "procurator.packages.\${system}.procurator-agent";
      description = ''
        The package providing `bin/procurator-agent`. The flake's
        `nixosModules.agent` sets it to the flake's own build.
      '';
    };

    controlPlane = lib.mkOption {
      type = lib.types.strMatching "https://[^[:space:]]+";
      example = "https://control-plane-1.example.org:7700";
      description = ''
        The control plane to dial, `https://HOST:PORT`. The agent always
        dials out, so it works behind NAT; HOST must be a name in the control
        plane's certificate.
      '';
    };

    tls = {
      caFile = lib.mkOption {
        type = lib.types.path;
        example = "/etc/procurator/tls/ca.crt";
        description = "The fleet CA certificate (`ca.crt` of `procurator-ctl pki init`).";
      };
      certFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        example = "/etc/procurator/tls/agent.crt";
        description = ''
          This machine's agent certificate, from
          `procurator-ctl pki issue --role agent --name MACHINE`. Its name is
          the machine's identity: the control plane sends it only the
          deployments of the blueprint entry of that name. Null (with
          `joinTokenFile`): the agent enrolls and keeps its certificate and
          key in its state directory, renewing them itself.
        '';
      };
      keyFile = lib.mkOption {
        type = lib.types.nullOr secretPath;
        default = null;
        example = "/etc/procurator/tls/agent.key";
        description = ''
          The agent certificate's private key. Keep it out of the Nix store:
          provision it with a secrets tool (agenix, sops-nix) or by hand. The
          service reads it through `LoadCredential=`.
        '';
      };
    };

    joinTokenFile = lib.mkOption {
      type = lib.types.nullOr secretPath;
      default = null;
      example = "/run/keys/procurator-join-token";
      description = ''
        A file holding a one-time join token
        (`procurator-ctl enroll-token --name MACHINE`). Without a
        certificate in its state directory, the agent makes its key on this
        machine and enrolls with the token; it renews the certificate
        itself from then on, and the token is not needed again (unless the
        certificate is left to expire or is revoked: then a new token
        enrolls it again). The control plane must run with
        `issuingCa.certFile` and `issuingCa.keyFile`.
      '';
    };

    name = lib.mkOption {
      type = lib.types.nullOr (lib.types.strMatching "[a-z0-9]([a-z0-9-]*[a-z0-9])?");
      default = null;
      example = "web-1";
      description = ''
        The name this machine enrolls as, as the blueprint names it
        (`--name`); null uses the host name.
      '';
    };

    substituters = lib.mkOption {
      type = lib.types.listOf storeUri;
      default = [ ];
      example = [ "https://cache.example.org" ];
      description = ''
        Binary caches to pull closures from, tried in order. Any store URI
        `nix copy --from` takes. They live only here: the control plane
        cannot add one.
      '';
    };

    trustedPublicKeys = lib.mkOption {
      type = lib.types.listOf publicKey;
      default = [ ];
      example = [ "cache.example.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      description = ''
        The keys a closure must be signed with (the public half of the key CI
        signs with: `procurator-ctl ci --signing-key`). They live only here,
        in the machine's own configuration, so the control plane cannot make
        the agent trust a new key. With none, nothing can be copied.
      '';
    };

    intentPublicKeys = lib.mkOption {
      type = lib.types.listOf publicKey;
      default = [ ];
      example = [ "ci-intent-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      description = ''
        The keys deployments must be signed with (the public half of the key
        CI signs intents with: `procurator-ctl ci --intent-key`, and of any
        operator key used for `procurator-ctl rollback --intent-key`). With
        one, the agent acts only on a statement signed by these keys, for
        this machine and the closure it is sent, newer than any it accepted
        before: health checks, rollback and reboot policy come from it, not
        from the control plane. With none, the agent trusts the control
        plane for what it runs.
      '';
    };

    stateDirectory = lib.mkOption {
      type = lib.types.strMatching "[A-Za-z0-9][A-Za-z0-9._-]*";
      default = "procurator-agent";
      description = ''
        The directory under {file}`/var/lib` (systemd `StateDirectory=`) for
        the agent's crash journal and undelivered results.
      '';
    };

    logFormat = lib.mkOption {
      type = lib.types.enum [
        "text"
        "json"
      ];
      default = "text";
      description = "`text` or `json` log lines on stderr (the journal).";
    };

    vmHost = {
      enable = lib.mkEnableOption ''
        running the VM instances the control plane places on this machine
        (`procurator-agent --vm-host`). The VMs outlive the agent:
        restarting or stopping the service leaves them running, and the
        agent adopts them again when it starts. The machine's certificate
        must be issued with `procurator-ctl pki issue --vm-host` (or
        enrolled with a token from `procurator-ctl enroll-token --vm-host`),
        or the control plane refuses its capacity
      '';

      vmm = lib.mkOption {
        type = vmm;
        default = "cloud-hypervisor";
        description = ''
          What runs this host's VMs (`--vmm`). Only blueprint machines whose
          `deployment.backend` names it are placed here. cloud-hypervisor
          needs KVM; QEMU uses KVM where it can and TCG elsewhere.
        '';
      };

      cpus = lib.mkOption {
        type = lib.types.nullOr (lib.types.addCheck lib.types.number (n: n > 0));
        default = null;
        example = 6;
        description = "vCPUs offered to VMs (fractions allowed); null offers every online CPU.";
      };

      memoryMiB = lib.mkOption {
        type = lib.types.nullOr lib.types.ints.positive;
        default = null;
        example = 16384;
        description = "Memory offered to VMs, MiB; null offers all of the machine's but 1 GiB.";
      };

      labels = lib.mkOption {
        type = lib.types.listOf (lib.types.strMatching "[^[:space:]]+");
        default = [ ];
        example = [ "rack-1" ];
        description = "Labels of this VM host, shown with it by `procurator-ctl status`.";
      };

      bridge = lib.mkOption {
        type = lib.types.nullOr (lib.types.strMatching "[A-Za-z0-9_.-]{1,15}");
        default = null;
        example = "br0";
        description = ''
          The bridge every VM's tap joins (`--vm-bridge`). Define the bridge
          itself in the host's networking, e.g. `networking.bridges.br0`.
        '';
      };

      readyTimeout = lib.mkOption {
        type = lib.types.ints.positive;
        default = 300;
        description = ''
          Seconds a VM may take from its start to reporting that it is up
          and healthy (`--vm-ready-timeout`); past it, the VM counts as
          broken and, with the machine's autoRollback, goes back to the
          closure it ran before.
        '';
      };

      qemuPackage = lib.mkOption {
        type = lib.types.package;
        default = pkgs.qemu_kvm;
        defaultText = lib.literalExpression "pkgs.qemu_kvm";
        description = "Provides `qemu-system-x86_64`, which runs the VMs when `vmm` is `qemu`.";
      };

      cloudHypervisorPackage = lib.mkOption {
        type = lib.types.package;
        default = pkgs.cloud-hypervisor;
        defaultText = lib.literalExpression "pkgs.cloud-hypervisor";
        description = "Provides `cloud-hypervisor`, which runs the VMs when `vmm` is `cloud-hypervisor`.";
      };

      virtiofsdPackage = lib.mkOption {
        type = lib.types.package;
        default = pkgs.virtiofsd;
        defaultText = lib.literalExpression "pkgs.virtiofsd";
        description = ''
          Provides `virtiofsd`, one of which shares the host's /nix/store
          read-only with each cloud-hypervisor VM.
        '';
      };
    };

    extraPackages = lib.mkOption {
      type = lib.types.listOf lib.types.package;
      default = [ ];
      example = lib.literalExpression "[ pkgs.curl pkgs.openssh ]";
      description = ''
        Programs on the agent's `PATH`, for the blueprint's health checks
        (e.g. `curl`) and for store URIs that need a client (`ssh` for
        `ssh-ng://`). `nix`, `sh`, coreutils and `systemctl` are always there.
      '';
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [
        "--max-backoff"
        "60"
      ];
      description = "More command-line arguments for `procurator-agent`.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = (cfg.tls.certFile == null) == (cfg.tls.keyFile == null);
        message = "services.procurator-agent.tls.certFile and tls.keyFile go together: set both or neither.";
      }
      {
        assertion = cfg.tls.certFile != null || cfg.joinTokenFile != null;
        message = ''
          services.procurator-agent needs a certificate: set joinTokenFile to a
          token from `procurator-ctl enroll-token --name MACHINE`, or
          tls.certFile and tls.keyFile to files from `procurator-ctl pki issue`.
        '';
      }
    ];

    warnings =
      lib.optional (cfg.trustedPublicKeys == [ ]) ''
        services.procurator-agent.trustedPublicKeys is empty: the agent refuses
        every closure, since none can be signed with a key it trusts. Add the
        public key of the key CI signs closures with.
      ''
      ++ lib.optional (cfg.intentPublicKeys == [ ]) ''
        services.procurator-agent.intentPublicKeys is empty: the agent runs
        whatever the control plane sends it (health checks run as root). Add
        the public half of the key CI signs deployments with.
      '';

    systemd.services.procurator-agent = {
      description = "Procurator agent";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # The agent retries the control plane by itself; systemd only restarts
      # a crashed agent, and never stops trying.
      startLimitIntervalSec = 0;

      # `nix` and `nix-env` copy closures and move the system profile; health
      # checks run with `sh -c`.
      path = [
        config.nix.package
        pkgs.bash
      ]
      ++ lib.optionals cfg.vmHost.enable (
        [
          # `ip link set dev TAP master BRIDGE up`.
          pkgs.iproute2
        ]
        ++ (
          if cfg.vmHost.vmm == "qemu" then
            [ cfg.vmHost.qemuPackage ]
          else
            [
              cfg.vmHost.cloudHypervisorPackage
              cfg.vmHost.virtiofsdPackage
              # `setsid`: the VMM and virtiofsd run in sessions of their own.
              pkgs.util-linux
            ]
        )
      )
      ++ cfg.extraPackages;

      # switch-to-configuration, run by this very service, restarts the units
      # whose definitions changed. Restarting this one would kill its own
      # control group, and with it the activation half-way through. A new
      # agent therefore takes over at the next start (boot, crash or
      # `systemctl restart procurator-agent`).
      restartIfChanged = false;

      serviceConfig = {
        Type = "exec";
        ExecStart = lib.concatStringsSep " " (
          [
            (utils.escapeSystemdExecArgs (
              [
                (lib.getExe' cfg.package "procurator-agent")
                "--control-plane"
                cfg.controlPlane
                "--state-dir"
                "/var/lib/${cfg.stateDirectory}"
                "--log-format"
                cfg.logFormat
              ]
              ++ lib.concatMap (uri: [
                "--substituter"
                uri
              ]) cfg.substituters
              ++ lib.concatMap (key: [
                "--trusted-public-key"
                key
              ]) cfg.trustedPublicKeys
              ++ lib.concatMap (key: [
                "--intent-public-key"
                key
              ]) cfg.intentPublicKeys
              ++ lib.optionals (cfg.name != null) [
                "--name"
                cfg.name
              ]
              ++ lib.optionals cfg.vmHost.enable (
                [
                  "--vm-host"
                  "--vmm"
                  cfg.vmHost.vmm
                  "--vm-ready-timeout"
                  (toString cfg.vmHost.readyTimeout)
                ]
                ++ lib.optionals (cfg.vmHost.cpus != null) [
                  "--vm-cpus"
                  # toString would write 1.5 as 1.500000.
                  (builtins.toJSON cfg.vmHost.cpus)
                ]
                ++ lib.optionals (cfg.vmHost.memoryMiB != null) [
                  "--vm-memory-mib"
                  (toString cfg.vmHost.memoryMiB)
                ]
                ++ lib.concatMap (label: [
                  "--vm-label"
                  label
                ]) cfg.vmHost.labels
                ++ lib.optionals (cfg.vmHost.bridge != null) [
                  "--vm-bridge"
                  cfg.vmHost.bridge
                ]
              )
            ))
            # %d is the credentials directory LoadCredential= fills; it is
            # left unescaped so systemd expands it.
            "--tls-ca %d/ca.crt"
          ]
          # Without certificate files the agent keeps its own in its state
          # directory, where it can renew them.
          ++ lib.optional (cfg.tls.certFile != null) "--tls-cert %d/tls.crt --tls-key %d/tls.key"
          ++ lib.optional (cfg.joinTokenFile != null) "--join-token %d/join-token"
          ++ lib.optional (cfg.extraArgs != [ ]) (utils.escapeSystemdExecArgs cfg.extraArgs)
        );
        LoadCredential = [
          "ca.crt:${cfg.tls.caFile}"
        ]
        ++ lib.optionals (cfg.tls.certFile != null) [
          "tls.crt:${cfg.tls.certFile}"
          "tls.key:${cfg.tls.keyFile}"
        ]
        ++ lib.optional (cfg.joinTokenFile != null) "join-token:${cfg.joinTokenFile}";
        StateDirectory = cfg.stateDirectory;
        StateDirectoryMode = "0700";

        # The VMs' processes (QEMU, or cloud-hypervisor and virtiofsd) live
        # in this unit's control group; they must survive the agent's
        # restarts (it adopts them again).
        KillMode = if cfg.vmHost.enable then "process" else "control-group";

        Restart = "always";
        RestartSec = "1s";
        RestartSteps = 5;
        RestartMaxDelaySec = "30s";

        # Hardening is limited on purpose. The agent activates whole NixOS
        # systems: as root it writes /nix/store, /nix/var/nix/profiles, /etc,
        # /boot and /run, installs the boot loader, creates users, home
        # directories and setuid wrappers, sets the host name and restarts
        # units. Every sandboxing option that gives the service a mount
        # namespace of its own (ProtectSystem, ProtectHome, PrivateTmp,
        # PrivateDevices, ProtectKernel*, ...) would also hide the mounts
        # activation makes (/run/wrappers, /run/keys, /boot) from the rest of
        # the machine; dropping capabilities, NoNewPrivileges,
        # RestrictSUIDSGID or a system-call filter would break parts of
        # activation. What is left cannot get in activation's way:
        LockPersonality = true;
        RestrictRealtime = true;
      };
    };
  };
}
