# Checks of the NixOS modules, evaluated with ./stub-nixos.nix. Evaluates to
# the list of what is wrong; run.sh expects [ ].
let
  stub = import ./stub-nixos.nix;

  fakePackage = name: {
    inherit name;
    type = "derivation";
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };

  key = "cache.example.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
  intentKey = "ci-intent-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

  agentSettings = {
    services.procurator-agent = {
      enable = true;
      package = fakePackage "procurator-agent";
      controlPlane = "https://control-plane-1.example.org:7700";
      tls = {
        caFile = "/etc/procurator/tls/ca.crt";
        certFile = "/etc/procurator/tls/agent.crt";
        keyFile = "/etc/procurator/tls/agent.key";
      };
      # `%` and `$` must reach the agent as they are, not as a systemd
      # specifier or variable.
      substituters = [
        "https://cache.example.org"
        "s3://fleet-cache?endpoint=minio.internal&profile=%user$HOME"
      ];
      trustedPublicKeys = [ key ];
      intentPublicKeys = [ intentKey ];
      logFormat = "json";
      extraPackages = [ (fakePackage "curl") ];
      extraArgs = [
        "--max-backoff"
        "60"
      ];
    };
  };

  agentConfig = {
    nix.package = fakePackage "nix";
  };
  agentPkgs = {
    bash = fakePackage "bash";
    qemu_kvm = fakePackage "qemu";
    iproute2 = fakePackage "iproute2";
    cloud-hypervisor = fakePackage "cloud-hypervisor";
    virtiofsd = fakePackage "virtiofsd";
    util-linux = fakePackage "util-linux";
  };

  agent =
    settings:
    stub.evalModule {
      module = ../modules/agent.nix;
      inherit settings;
      config = agentConfig;
      pkgs = agentPkgs;
    };

  guest =
    vmm:
    stub.evalModule {
      module = ../modules/vm-guest.nix;
      settings.procurator.vmGuest = {
        enable = true;
        inherit vmm;
        readyInterval = 7;
      };
      config.systemd.package = fakePackage "systemd";
      pkgs = {
        coreutils = fakePackage "coreutils";
      };
    };

  controlPlaneSettings = {
    services.procurator-control-plane = {
      enable = true;
      package = fakePackage "procurator-control-plane";
      openFirewall = true;
      tls = {
        caFile = "/etc/procurator/tls/ca.crt";
        certFile = "/etc/procurator/tls/control-plane.crt";
        keyFile = "/etc/procurator/tls/control-plane.key";
      };
    };
  };

  controlPlane =
    settings:
    stub.evalModule {
      module = ../modules/control-plane.nix;
      inherit settings;
    };

  withControlPlane =
    extra:
    controlPlaneSettings
    // {
      services.procurator-control-plane = controlPlaneSettings.services.procurator-control-plane // extra;
    };

  agentUnit = (agent agentSettings).config.systemd.services.procurator-agent;
  cpUnit = (controlPlane controlPlaneSettings).config.systemd.services.procurator-control-plane;
  cpLowPort =
    (controlPlane (withControlPlane {
      port = 443;
      listenAddress = "::";
    })).config.systemd.services.procurator-control-plane;

  credentials = [
    "ca.crt:/etc/procurator/tls/ca.crt"
    "tls.crt:/etc/procurator/tls/agent.crt"
    "tls.key:/etc/procurator/tls/agent.key"
  ];

  # [ "what: expected X, got Y" ] when they differ.
  expect =
    what: expected: actual:
    if expected == actual then
      [ ]
    else
      [ "${what}: expected ${builtins.toJSON expected}, got ${builtins.toJSON actual}" ];

  # Every option says what it is for and has a type its default fits.
  optionChecks =
    module: options:
    builtins.concatMap (
      { path, option }:
      (if builtins.isString (option.description or null) && option.description != "" then
        [ ]
      else
        [ "${module}: option ${path} has no description" ])
      ++ (if option.type._type or null == "option-type" then
        [ ]
      else
        [ "${module}: option ${path} has no type" ])
      ++ (if !(option ? default) || option.type.check option.default then
        [ ]
      else
        [ "${module}: option ${path}: the default does not fit the type" ])
      ++ (
        if !(option ? example) || option.example._type or null == "literalExpression" || option.type.check option.example then
          [ ]
        else
          [ "${module}: option ${path}: the example does not fit the type" ]
      )
    ) (stub.optionList "" options);
in
optionChecks "agent.nix" (agent agentSettings).options
++ optionChecks "vm-guest.nix" (guest "qemu").options
++ (
  let
    qemuGuest = (guest "qemu").config;
    chGuest = (guest "cloud-hypervisor").config;
    ready = qemuGuest.systemd.services.procurator-vm-ready;
  in
  expect "guest store over 9p under QEMU" "9p" qemuGuest.fileSystems."/nix/.ro-store".fsType
  ++ expect "guest store over virtiofs under cloud-hypervisor" "virtiofs"
    chGuest.fileSystems."/nix/.ro-store".fsType
  ++ expect "guest 9p options" true (builtins.elem "trans=virtio" qemuGuest.fileSystems."/nix/.ro-store".options)
  ++ expect "guest store read-only" true (builtins.elem "ro" chGuest.fileSystems."/nix/.ro-store".options)
  ++ expect "guest writable layer" "/nix/.rw-store/store" qemuGuest.fileSystems."/nix/store".overlay.upperdir
  ++ expect "guest root in memory" "tmpfs" qemuGuest.fileSystems."/".fsType
  ++ expect "guest has no boot loader" false chGuest.boot.loader.grub.enable
  ++ expect "guest initrd modules (QEMU)" [ "virtio_pci" "overlay" "9p" "9pnet_virtio" ]
    qemuGuest.boot.initrd.availableKernelModules
  ++ expect "guest readiness on the serial console" "/dev/ttyS0" ready.serviceConfig.TTYPath
  ++ expect "guest readiness line" true (
    stub.lib.hasInfix ''line="procurator-ready $closure"'' ready.script
    && stub.lib.hasInfix "systemctl is-system-running --wait" ready.script
    && stub.lib.hasInfix ''line="procurator-unhealthy $closure $state'' ready.script
  )
  ++ expect "guest readiness repeats" true (stub.lib.hasInfix "sleep 7" ready.script)
  ++ expect "guest disabled" { } (stub.evalModule {
    module = ../modules/vm-guest.nix;
    settings = { };
    pkgs = { coreutils = fakePackage "coreutils"; };
  }).config
)
++ optionChecks "control-plane.nix" (controlPlane controlPlaneSettings).options

# The agent.
++ expect "agent ExecStart" (builtins.concatStringsSep " " [
  ''"/nix/store/00000000000000000000000000000000-procurator-agent/bin/procurator-agent"''
  ''"--control-plane" "https://control-plane-1.example.org:7700"''
  ''"--state-dir" "/var/lib/procurator-agent" "--log-format" "json"''
  ''"--substituter" "https://cache.example.org"''
  ''"--substituter" "s3://fleet-cache?endpoint=minio.internal&profile=%%user$$HOME"''
  ''"--trusted-public-key" "${key}"''
  ''"--intent-public-key" "${intentKey}"''
  "--tls-ca %d/ca.crt --tls-cert %d/tls.crt --tls-key %d/tls.key"
  ''"--max-backoff" "60"''
]) agentUnit.serviceConfig.ExecStart
++ expect "agent LoadCredential" credentials agentUnit.serviceConfig.LoadCredential
++ expect "agent not a VM host" "control-group" agentUnit.serviceConfig.KillMode
++ expect "agent not a VM host: no --vm-host" false (
  stub.lib.hasInfix "--vm-host" agentUnit.serviceConfig.ExecStart
)
++ (
  let
    vmHost =
      vmHost:
      (agent (agentSettings // {
        services.procurator-agent = agentSettings.services.procurator-agent // {
          inherit vmHost;
        };
      })).config.systemd.services.procurator-agent;
    host = vmHost {
      enable = true;
      cpus = 1.5;
      memoryMiB = 4096;
      labels = [ "rack-1" ];
      bridge = "br0";
    };
    qemuHost = vmHost {
      enable = true;
      vmm = "qemu";
      readyTimeout = 600;
    };
  in
  expect "VM host flags" true (
    stub.lib.hasInfix ''"--vm-host" "--vmm" "cloud-hypervisor" "--vm-ready-timeout" "300" "--vm-cpus" "1.5" "--vm-memory-mib" "4096" "--vm-label" "rack-1" "--vm-bridge" "br0"'' host.serviceConfig.ExecStart
  )
  ++ expect "VM host keeps its VMs on restart" "process" host.serviceConfig.KillMode
  ++ expect "VM host PATH" [
    "nix"
    "bash"
    "iproute2"
    "cloud-hypervisor"
    "virtiofsd"
    "util-linux"
    "curl"
  ] (map (p: p.name) host.path)
  ++ expect "QEMU VM host flags" true (
    stub.lib.hasInfix ''"--vm-host" "--vmm" "qemu" "--vm-ready-timeout" "600"'' qemuHost.serviceConfig.ExecStart
  )
  ++ expect "QEMU VM host PATH" [ "nix" "bash" "iproute2" "qemu" "curl" ] (map (p: p.name) qemuHost.path)
)
++ expect "agent StateDirectory" "procurator-agent" agentUnit.serviceConfig.StateDirectory
++ expect "agent PATH" [ "nix" "bash" "curl" ] (map (p: p.name) agentUnit.path)
++ expect "agent Restart" "always" agentUnit.serviceConfig.Restart
++ expect "agent restartIfChanged" false agentUnit.restartIfChanged
++ expect "agent after" [ "network-online.target" ] agentUnit.after
++ expect "agent wants" [ "network-online.target" ] agentUnit.wants
++ expect "agent runs as root" false (agentUnit.serviceConfig ? User || agentUnit.serviceConfig ? DynamicUser)
++ expect "agent has no mount namespace" [ ] (
  builtins.filter (option: agentUnit.serviceConfig ? ${option}) [
    "ProtectSystem"
    "ProtectHome"
    "PrivateTmp"
    "PrivateDevices"
    "ProtectKernelModules"
    "ProtectKernelTunables"
  ]
)
++ expect "agent warnings with keys" [ ] (agent agentSettings).config.warnings
++ expect "agent warns without intent keys" 1 (
  builtins.length
    (agent (agentSettings // {
      services.procurator-agent = agentSettings.services.procurator-agent // {
        intentPublicKeys = [ ];
      };
    })).config.warnings
)
++ expect "agent warns without keys" 1 (
  builtins.length
    (agent (agentSettings // {
      services.procurator-agent = agentSettings.services.procurator-agent // {
        trustedPublicKeys = [ ];
      };
    })).config.warnings
)
++ expect "agent disabled" { } (
  agent {
    services.procurator-agent = agentSettings.services.procurator-agent // {
      enable = false;
    };
  }
).config

# An agent that enrolls with a join token keeps its certificate in its
# state directory; one with neither a token nor certificate files fails an
# assertion.
++ (
  let
    enrolling =
      tls: extra:
      agent (agentSettings // {
        services.procurator-agent = agentSettings.services.procurator-agent // { inherit tls; } // extra;
      });
    withToken = enrolling { caFile = "/etc/procurator/tls/ca.crt"; } {
      joinTokenFile = "/run/keys/procurator-join-token";
      name = "web-1";
    };
    unit = withToken.config.systemd.services.procurator-agent;
    failing = module: map (a: a.message) (builtins.filter (a: !a.assertion) module.config.assertions);
  in
  expect "enrolling agent flags" true (
    stub.lib.hasInfix ''"--name" "web-1" --tls-ca %d/ca.crt --join-token %d/join-token'' unit.serviceConfig.ExecStart
  )
  ++ expect "enrolling agent has no certificate flags" false (
    stub.lib.hasInfix "--tls-cert" unit.serviceConfig.ExecStart
  )
  ++ expect "enrolling agent LoadCredential" [
    "ca.crt:/etc/procurator/tls/ca.crt"
    "join-token:/run/keys/procurator-join-token"
  ] unit.serviceConfig.LoadCredential
  ++ expect "enrolling agent passes its assertions" [ ] (failing withToken)
  ++ expect "agent with certificate files passes its assertions" [ ] (failing (agent agentSettings))
  ++ expect "agent without a certificate or a token fails an assertion" 1 (
    builtins.length (failing (enrolling { caFile = "/etc/procurator/tls/ca.crt"; } { }))
  )
  ++ expect "agent with a certificate but no key fails an assertion" 1 (
    builtins.length (failing (enrolling {
      caFile = "/etc/procurator/tls/ca.crt";
      certFile = "/etc/procurator/tls/agent.crt";
    } { joinTokenFile = "/run/keys/t"; }))
  )
)

# The control plane.
++ expect "control plane ExecStart" (builtins.concatStringsSep " " [
  ''"/nix/store/00000000000000000000000000000000-procurator-control-plane/bin/procurator-control-plane"''
  ''"--listen" "0.0.0.0:7700" "--data-dir" "/var/lib/procurator" "--log-format" "text"''
  ''"--retain-deployments" "500" "--retain-events-days" "30" "--database" "sqlite"''
  "--tls-ca %d/ca.crt --tls-cert %d/tls.crt --tls-key %d/tls.key"
]) cpUnit.serviceConfig.ExecStart
++ expect "control plane signs agents' certificates" true (
  let
    unit = (controlPlane (withControlPlane {
      issuingCa = {
        certFile = "/etc/procurator/tls/issuing-ca.crt";
        keyFile = "/etc/procurator/tls/issuing-ca.key";
        agentCertValidity = "7d";
      };
    })).config.systemd.services.procurator-control-plane;
  in
  stub.lib.hasInfix ''--issuing-ca-cert %d/issuing-ca.crt --issuing-ca-key %d/issuing-ca.key "--agent-cert-validity" "7d"'' unit.serviceConfig.ExecStart
  && builtins.elem "issuing-ca.key:/etc/procurator/tls/issuing-ca.key" unit.serviceConfig.LoadCredential
)
++ expect "control plane without an issuing CA does not sign" false (
  stub.lib.hasInfix "--issuing-ca" cpUnit.serviceConfig.ExecStart
)
++ expect "control plane retention" true (
  stub.lib.hasInfix ''"--retain-deployments" "20" "--retain-events-days" "7"''
    (controlPlane (withControlPlane {
      retention = {
        deployments = 20;
        eventsDays = 7;
      };
    })).config.systemd.services.procurator-control-plane.serviceConfig.ExecStart
)
++ expect "control plane on PostgreSQL" [ true true true true ] (
  let
    unit =
      (controlPlane (withControlPlane {
        database = {
          url = "postgres://procurator@db1,db2/procurator?target_session_attrs=read-write";
          passwordFile = "/run/secrets/db-password";
          caFile = "/etc/procurator/db-ca.crt";
        };
      })).config.systemd.services.procurator-control-plane.serviceConfig;
  in
  [
    (stub.lib.hasInfix "--database-password-file %d/db-password" unit.ExecStart)
    (builtins.elem "db-password:/run/secrets/db-password" unit.LoadCredential)
    (stub.lib.hasInfix "--database-ca-file %d/db-ca.crt" unit.ExecStart)
    (builtins.elem "db-ca.crt:/etc/procurator/db-ca.crt" unit.LoadCredential)
  ]
)
++ expect "control plane LoadCredential" [
  "ca.crt:/etc/procurator/tls/ca.crt"
  "tls.crt:/etc/procurator/tls/control-plane.crt"
  "tls.key:/etc/procurator/tls/control-plane.key"
] cpUnit.serviceConfig.LoadCredential
++ expect "control plane firewall" [ 7700 ]
  (controlPlane controlPlaneSettings).config.networking.firewall.allowedTCPPorts
++ expect "control plane firewall closed" { } (
  controlPlane (withControlPlane { openFirewall = false; })
).config.networking.firewall
++ expect "control plane sandbox" {
  DynamicUser = true;
  ProtectSystem = "strict";
  PrivateTmp = true;
  NoNewPrivileges = true;
  CapabilityBoundingSet = "";
  PrivateUsers = true;
  StateDirectory = "procurator";
  SystemCallFilter = [
    "@system-service"
    "~@privileged"
    "~@resources"
  ];
  RestrictAddressFamilies = [
    "AF_INET"
    "AF_INET6"
    "AF_UNIX"
  ];
  Restart = "always";
} (builtins.intersectAttrs {
  DynamicUser = null;
  ProtectSystem = null;
  PrivateTmp = null;
  NoNewPrivileges = null;
  CapabilityBoundingSet = null;
  PrivateUsers = null;
  StateDirectory = null;
  SystemCallFilter = null;
  RestrictAddressFamilies = null;
  Restart = null;
} cpUnit.serviceConfig)
++ expect "control plane on a low port" {
  CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" ];
  AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" ];
  PrivateUsers = false;
} (builtins.intersectAttrs {
  CapabilityBoundingSet = null;
  AmbientCapabilities = null;
  PrivateUsers = null;
} cpLowPort.serviceConfig)
++ expect "control plane on IPv6" true (
  builtins.match ''.*"--listen" "\[::]:443".*'' cpLowPort.serviceConfig.ExecStart != null
)
++ expect "control plane tells systemd when it serves" "notify" cpUnit.serviceConfig.Type
++ expect "control plane AmbientCapabilities on a high port" false (cpUnit.serviceConfig ? AmbientCapabilities)
