# services.procurator-control-plane: the gRPC server agents dial into and CI
# submits deployments to (flags as docs/interfaces.md says).
{
  config,
  lib,
  utils,
  ...
}:
let
  cfg = config.services.procurator-control-plane;

  # IPv6 literals need brackets in HOST:PORT.
  listen =
    if lib.hasInfix ":" cfg.listenAddress then
      "[${cfg.listenAddress}]:${toString cfg.port}"
    else
      "${cfg.listenAddress}:${toString cfg.port}";

  # A port below 1024 needs CAP_NET_BIND_SERVICE, which a private user
  # namespace would take away again.
  privilegedPort = cfg.port < 1024;

  inherit (import ./types.nix lib) secretPath;
in
{
  options.services.procurator-control-plane = {
    enable = lib.mkEnableOption "the Procurator control plane, which agents connect to and CI submits deployments to";

    package = lib.mkOption {
      type = lib.types.package;
      defaultText = lib.literalExpression "procurator.packages.\${system}.procurator-control-plane";
      description = ''
        The package providing `bin/procurator-control-plane`. The flake's
        `nixosModules.control-plane` sets it to the flake's own build.
      '';
    };

    listenAddress = lib.mkOption {
      type = lib.types.str;
      default = "0.0.0.0";
      example = "::";
      description = "The address to listen on for agents, CI and operators (gRPC over mutual TLS).";
    };

    port = lib.mkOption {
      type = lib.types.port;
      default = 7700;
      description = "The TCP port to listen on.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Open {option}`services.procurator-control-plane.port` in the firewall.
        Every client must present a certificate of the fleet CA, so the port
        can face the machines' network.
      '';
    };

    tls = {
      caFile = lib.mkOption {
        type = lib.types.path;
        example = "/etc/procurator/tls/ca.crt";
        description = ''
          The fleet CA certificate (`ca.crt` of `procurator-ctl pki init`);
          clients must present a certificate it signed.
        '';
      };
      certFile = lib.mkOption {
        type = lib.types.path;
        example = "/etc/procurator/tls/control-plane.crt";
        description = ''
          The control plane's server certificate (`control-plane.crt`). Its
          names must include the host name agents and CI dial
          (`procurator-ctl pki init --san NAME`).
        '';
      };
      keyFile = lib.mkOption {
        type = secretPath;
        example = "/etc/procurator/tls/control-plane.key";
        description = ''
          The server certificate's private key (`control-plane.key`). It may
          be readable by root only: systemd hands the service a copy
          (`LoadCredential=`). Keep it out of the Nix store: provision it with
          a secrets tool (agenix, sops-nix) or by hand.
        '';
      };
    };

    issuingCa = {
      certFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        example = "/etc/procurator/tls/issuing-ca.crt";
        description = ''
          The CA the control plane signs agents' certificates with when they
          enroll with a join token or renew (`--issuing-ca-cert`): an issuing
          CA from `procurator-ctl pki intermediate`, so that the fleet CA's
          key stays offline. Null: agents neither enroll nor renew here.
        '';
      };
      keyFile = lib.mkOption {
        type = lib.types.nullOr secretPath;
        default = null;
        example = "/etc/procurator/tls/issuing-ca.key";
        description = "The issuing CA's key (`--issuing-ca-key`), handed over by `LoadCredential=`.";
      };
      agentCertValidity = lib.mkOption {
        type = lib.types.strMatching "[0-9]+[smhd]";
        default = "30d";
        description = ''
          How long an agent certificate it signs is valid
          (`--agent-cert-validity`); agents renew two thirds into it.
        '';
      };
    };

    stateDirectory = lib.mkOption {
      type = lib.types.strMatching "[A-Za-z0-9][A-Za-z0-9._-]*";
      default = "procurator";
      description = ''
        The directory under {file}`/var/lib` (systemd `StateDirectory=`) that
        holds the SQLite store `procurator.db`: deployments, agents and the
        event log. Back it up.
      '';
    };

    database = {
      url = lib.mkOption {
        type = lib.types.str;
        default = "sqlite";
        example = "postgres://procurator@db1.example.org,db2.example.org/procurator?target_session_attrs=read-write";
        description = ''
          Where the state store lives (`--database`): `sqlite`, the embedded
          store in {option}`stateDirectory`, or a PostgreSQL URL (several
          hosts with `target_session_attrs=read-write` follow a failover).
          Put the password in {option}`database.passwordFile`, not here.
        '';
      };
      passwordFile = lib.mkOption {
        type = lib.types.nullOr secretPath;
        default = null;
        example = "/run/secrets/procurator-db-password";
        description = ''
          A file holding the PostgreSQL password (`--database-password-file`);
          systemd hands the service a copy (`LoadCredential=`).
        '';
      };
      caFile = lib.mkOption {
        type = lib.types.nullOr secretPath;
        default = null;
        example = "/etc/procurator/db-ca.crt";
        description = ''
          The CA that signed the PostgreSQL server's certificate
          (`--database-ca-file`): the connection is then TLS, with the
          certificate and the host's name checked.
        '';
      };
    };

    retention = {
      deployments = lib.mkOption {
        type = lib.types.ints.positive;
        default = 500;
        description = ''
          How many of the newest deployments the store keeps, with their
          machine rows and events (`--retain-deployments`). Older finished
          ones are pruned; one that has not finished is always kept.
        '';
      };
      eventsDays = lib.mkOption {
        type = lib.types.ints.between 1 36500;
        default = 30;
        description = ''
          Days of events the event log keeps (`--retain-events-days`). A
          `Watch` from a pruned revision is told the oldest one to resume from.
        '';
      };
    };

    logFormat = lib.mkOption {
      type = lib.types.enum [
        "text"
        "json"
      ];
      default = "text";
      description = "`text` or `json` log lines on stderr (the journal).";
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [
        "--keepalive"
        "30"
        "--hello-timeout"
        "5"
      ];
      description = "More command-line arguments for `procurator-control-plane`.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = (cfg.issuingCa.certFile == null) == (cfg.issuingCa.keyFile == null);
        message = "services.procurator-control-plane.issuingCa.certFile and issuingCa.keyFile go together: set both or neither.";
      }
    ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.port ];

    systemd.services.procurator-control-plane = {
      description = "Procurator control plane";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # Keep retrying (with the backoff below) rather than give up after five
      # quick failures: agents and CI wait on this service.
      startLimitIntervalSec = 0;

      serviceConfig = {
        # READY=1 once it listens, so units ordered after this one start
        # when agents and CI can reach it.
        Type = "notify";
        ExecStart = lib.concatStringsSep " " (
          [
            (utils.escapeSystemdExecArgs [
              (lib.getExe' cfg.package "procurator-control-plane")
              "--listen"
              listen
              "--data-dir"
              "/var/lib/${cfg.stateDirectory}"
              "--log-format"
              cfg.logFormat
              "--retain-deployments"
              (toString cfg.retention.deployments)
              "--retain-events-days"
              (toString cfg.retention.eventsDays)
              "--database"
              cfg.database.url
            ])
            # %d is the credentials directory LoadCredential= fills; it is
            # left unescaped so systemd expands it.
            "--tls-ca %d/ca.crt --tls-cert %d/tls.crt --tls-key %d/tls.key"
          ]
          ++ lib.optional (cfg.issuingCa.certFile != null) (
            "--issuing-ca-cert %d/issuing-ca.crt --issuing-ca-key %d/issuing-ca.key "
            + utils.escapeSystemdExecArgs [
              "--agent-cert-validity"
              cfg.issuingCa.agentCertValidity
            ]
          )
          ++ lib.optional (cfg.database.passwordFile != null) "--database-password-file %d/db-password"
          ++ lib.optional (cfg.database.caFile != null) "--database-ca-file %d/db-ca.crt"
          ++ lib.optional (cfg.extraArgs != [ ]) (utils.escapeSystemdExecArgs cfg.extraArgs)
        );
        # Copies readable by the dynamic user only, whatever the modes of the
        # originals.
        LoadCredential = [
          "ca.crt:${cfg.tls.caFile}"
          "tls.crt:${cfg.tls.certFile}"
          "tls.key:${cfg.tls.keyFile}"
        ]
        ++ lib.optionals (cfg.issuingCa.certFile != null) [
          "issuing-ca.crt:${cfg.issuingCa.certFile}"
          "issuing-ca.key:${cfg.issuingCa.keyFile}"
        ]
        ++ lib.optional (cfg.database.passwordFile != null) "db-password:${cfg.database.passwordFile}"
        ++ lib.optional (cfg.database.caFile != null) "db-ca.crt:${cfg.database.caFile}";

        # SIGTERM drains in-flight RPCs for at most 10 s, then exits 0.
        KillSignal = "SIGTERM";
        TimeoutStopSec = "30s";
        Restart = "always";
        RestartSec = "1s";
        RestartSteps = 5;
        RestartMaxDelaySec = "30s";
        # One socket per connected agent.
        LimitNOFILE = 1048576;

        # It needs nothing but its state directory and its port: lock down
        # the rest.
        DynamicUser = true;
        StateDirectory = cfg.stateDirectory;
        StateDirectoryMode = "0700";
        UMask = "0077";
        CapabilityBoundingSet = if privilegedPort then [ "CAP_NET_BIND_SERVICE" ] else "";
        AmbientCapabilities = lib.mkIf privilegedPort [ "CAP_NET_BIND_SERVICE" ];
        PrivateUsers = !privilegedPort;
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        DevicePolicy = "closed";
        PrivateIPC = true;
        ProtectHostname = true;
        ProtectClock = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        # AF_UNIX for the journal and sd_notify.
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        RemoveIPC = true;
        LockPersonality = true;
        # Rust and bundled SQLite: no JIT, no writable executable memory.
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
          "~@resources"
        ];
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
