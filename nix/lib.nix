# Procurator's Nix library: turns a cluster description into the flake
# outputs that `procurator-ctl` reads.
#
# Plain Nix, no nixpkgs: the flake's `lib` output is this file, so evaluating
# `.#blueprintJSON` never fetches or evaluates nixpkgs, and the tests in
# ./tests/run.sh run with nothing but Nix.
let
  inherit (builtins)
    attrNames
    concatStringsSep
    elem
    elemAt
    filter
    genList
    isAttrs
    isBool
    isFloat
    isFunction
    isInt
    isList
    isString
    length
    mapAttrs
    match
    toJSON
    typeOf
    ;

  # Like a DNS label, as `procurator_core::names::MachineName` accepts: the
  # name ends up in certificates, host names and file names.
  machineNamePattern = "[A-Za-z0-9][A-Za-z0-9_-]{0,62}";

  # `procurator_core::artifact::MemoryUnit`.
  memoryUnits = [
    "MB"
    "GB"
    "TB"
    "MiB"
    "GiB"
    "TiB"
  ];

  # The keys `procurator_core::artifact` accepts (it denies unknown fields, so
  # a typo here would only surface when CI submits the deployment).
  machineKeys = [
    "role"
    "cpu"
    "memory"
    "labels"
    "replicas"
    "deployment"
  ];
  memoryKeys = [
    "amount"
    "unit"
  ];
  deploymentKeys = [
    "addr"
    "backend"
    "sshUser"
    "sshPort"
    "healthChecks"
    "autoRollback"
    "allowReboot"
  ];
  healthCheckKeys = [
    "enabled"
    "command"
    "timeout"
    "interval"
  ];

  # Errors name the field as a path, the way `procurator-ctl validate` does
  # (e.g. `machines.worker-1.deployment.healthChecks[0].timeout`).
  fail = path: message: throw "procurator.lib.mkCluster: ${path}: ${message}";

  showList = names: concatStringsSep ", " (map toJSON names);

  # What a value is, for error messages: its type, and the value itself when
  # it is short enough to help.
  describe =
    value:
    if isString value || isInt value || isFloat value || isBool value then
      "${typeOf value} ${toJSON value}"
    else
      typeOf value;

  imap0 = f: list: genList (i: f i (elemAt list i)) (length list);

  isNumber = value: isInt value || isFloat value;

  # An attribute set whose keys all come from `allowed`.
  attrsWith =
    path: allowed: what: value:
    if !isAttrs value then
      fail path "expected ${what}, got ${describe value}"
    else
      let
        unknown = filter (key: !elem key allowed) (attrNames value);
      in
      if unknown == [ ] then
        value
      else
        fail path "unknown ${
          if length unknown == 1 then "key" else "keys"
        } ${showList unknown}; allowed: ${showList allowed}";

  required =
    path: attrs: key: hint:
    if attrs ? ${key} then attrs.${key} else fail "${path}.${key}" "missing; ${hint}";

  nonEmptyString =
    path: value:
    if isString value && match "[[:space:]]*" value == null then
      value
    else
      fail path "expected a non-empty string, got ${describe value}";

  positiveNumber =
    path: value:
    if isNumber value && value > 0 then
      value
    else
      fail path "expected a positive number, got ${describe value}";

  integerBetween =
    path: low: high: value:
    if isInt value && value >= low && value <= high then
      value
    else
      fail path "expected a whole number from ${toString low} to ${toString high}, got ${describe value}";

  bool =
    path: value:
    if isBool value then value else fail path "expected true or false, got ${describe value}";

  listOf =
    path: check: value:
    if isList value then
      imap0 (i: check "${path}[${toString i}]") value
    else
      fail path "expected a list, got ${describe value}";

  # Health checks retry every `interval` seconds until `timeout`;
  # `procurator_core::artifact::Seconds` takes 1 s to a day.
  seconds = path: integerBetween path 1 86400;

  normalizeHealthCheck =
    path: value:
    let
      check = attrsWith path healthCheckKeys "a health check { command, timeout, interval, enabled }" value;
    in
    {
      command = nonEmptyString "${path}.command" (
        required path check "command" "the shell line the agent runs with `sh -c`; exit 0 means healthy"
      );
      timeout = seconds "${path}.timeout" (
        required path check "timeout" "seconds the check may take to pass, e.g. timeout = 60"
      );
      interval = seconds "${path}.interval" (check.interval or 10);
      enabled = bool "${path}.enabled" (check.enabled or true);
    };

  normalizeDeployment =
    path: value:
    let
      deployment = attrsWith path deploymentKeys "an attribute set { addr, backend, ... }" value;
    in
    {
      addr = nonEmptyString "${path}.addr" (
        required path deployment "addr" "the address the machine is reached at, e.g. \"192.168.1.11\""
      );
      backend = nonEmptyString "${path}.backend" (
        required path deployment "backend" "what runs the machine, e.g. \"cloud-hypervisor\""
      );
      sshUser = nonEmptyString "${path}.sshUser" (deployment.sshUser or "root");
      sshPort = integerBetween "${path}.sshPort" 1 65535 (deployment.sshPort or 22);
      healthChecks = listOf "${path}.healthChecks" normalizeHealthCheck (deployment.healthChecks or [ ]);
      autoRollback = bool "${path}.autoRollback" (deployment.autoRollback or true);
    }
    # Only when set: the blueprint stays exactly as written otherwise.
    // (
      if deployment ? allowReboot then
        { allowReboot = bool "${path}.allowReboot" deployment.allowReboot; }
      else
        { }
    );

  normalizeMemory =
    path: value:
    let
      memory = attrsWith path memoryKeys "an attribute set { amount, unit }, e.g. { amount = 2; unit = \"GB\"; }" value;
      unit = required path memory "unit" "one of ${showList memoryUnits}";
    in
    {
      amount = positiveNumber "${path}.amount" (
        required path memory "amount" "a positive number of `unit`s, e.g. amount = 2"
      );
      unit =
        if elem unit memoryUnits then
          unit
        else
          fail "${path}.unit" "expected one of ${showList memoryUnits}, got ${describe unit}";
    };

  # The blueprint entry of one machine: checked, defaults filled in, without
  # `configuration`.
  normalizeMachine =
    name: value:
    let
      path = "machines.${name}";
      machine = attrsWith path (
        machineKeys ++ [ "configuration" ]
      ) "an attribute set { role, cpu, memory, deployment, configuration, ... }" value;
    in
    if match machineNamePattern name == null then
      fail "machines.${toJSON name}" "not a valid machine name: use 1 to 63 characters of a-z, A-Z, 0-9, '-' and '_', starting with a letter or digit"
    else
      {
        role = nonEmptyString "${path}.role" (
          required path machine "role" "what the machine is for, e.g. \"worker\""
        );
        cpu = positiveNumber "${path}.cpu" (
          required path machine "cpu" "the number of virtual CPUs, e.g. cpu = 2"
        );
        memory = normalizeMemory "${path}.memory" (
          required path machine "memory" "e.g. memory = { amount = 2; unit = \"GB\"; }"
        );
        labels = listOf "${path}.labels" nonEmptyString (machine.labels or [ ]);
        replicas = integerBetween "${path}.replicas" 1 4294967295 (machine.replicas or 1);
        deployment = normalizeDeployment "${path}.deployment" (
          required path machine "deployment" "e.g. deployment = { addr = \"192.168.1.11\"; backend = \"cloud-hypervisor\"; }"
        );
      };
in
{
  /**
    Describe a cluster once; get the flake outputs Procurator reads.

    `machines.<name>` is a blueprint entry (role, cpu, memory, labels,
    replicas, deployment { addr, backend, sshUser, sshPort, healthChecks,
    autoRollback }) plus `configuration`, the machine's NixOS module.
    `modules` are added to every machine (e.g. the agent's module).

    Returns:
    - `blueprint`: the entries without `configuration`, checked, with the
      defaults filled in (labels [ ], replicas 1, sshUser "root", sshPort 22,
      healthChecks [ ], autoRollback true; per check enabled true, interval 10).
    - `blueprintJSON`: the same attribute set. CI runs
      `nix eval --json .#blueprintJSON`, and `--json` serializes an attribute
      set into the blueprint object itself; a string made with
      `builtins.toJSON` would come out as one quoted JSON string instead.
      Neither touches `nixosSystem`, so evaluating them never evaluates NixOS.
    - `nixosConfigurations.<name>`: `nixosSystem { system, specialArgs,
      modules = modules ++ [ configuration { networking.hostName = name; } ]; }`.
      The host name is the machine name, which is also the name in the
      agent's certificate.

    `nixosSystem` is `nixpkgs.lib.nixosSystem`; `system = null` leaves the
    platform to the modules (`nixpkgs.hostPlatform`).
  */
  mkCluster =
    {
      machines,
      nixosSystem ? null,
      system ? "x86_64-linux",
      specialArgs ? { },
      modules ? [ ],
    }:
    let
      checkedMachines =
        if !isAttrs machines then
          fail "machines" "expected an attribute set of machines, got ${describe machines}"
        else if attrNames machines == [ ] then
          fail "machines" "no machine is defined; there is nothing to deploy"
        else
          machines;

      blueprint = mapAttrs normalizeMachine checkedMachines;

      mkNixos =
        name: machine:
        if nixosSystem == null then
          fail "nixosSystem" "not given, so machine ${toJSON name} cannot be built; pass nixosSystem = nixpkgs.lib.nixosSystem"
        else if !(isFunction nixosSystem || isAttrs nixosSystem && nixosSystem ? __functor) then
          fail "nixosSystem" "expected a function such as nixpkgs.lib.nixosSystem, got ${describe nixosSystem}"
        else if !isList modules then
          fail "modules" "expected a list of NixOS modules, got ${describe modules}"
        else if !isAttrs specialArgs then
          fail "specialArgs" "expected an attribute set, got ${describe specialArgs}"
        else
          nixosSystem (
            (if system == null then { } else { inherit system; })
            // {
              inherit specialArgs;
              modules = modules ++ [
                (required "machines.${name}" machine "configuration" "the machine's NixOS module, e.g. configuration = ./machines/${name}.nix")
                {
                  _file = "procurator.lib.mkCluster (machine ${name})";
                  networking.hostName = name;
                }
              ];
            }
          );
    in
    {
      inherit blueprint;
      blueprintJSON = blueprint;
      # A machine is only built from a valid blueprint entry: its checks run
      # first, so a bad entry fails the same way here as in blueprintJSON.
      nixosConfigurations = mapAttrs (
        name: machine: builtins.deepSeq blueprint.${name} (mkNixos name machine)
      ) checkedMachines;
    };

  /**
    A health check for `deployment.healthChecks`: the agent runs `command`
    with `sh -c` every `interval` seconds until it exits 0, and fails the
    deployment (rolling back) when `timeout` seconds pass first.
  */
  healthCheck =
    {
      command,
      timeout ? 60,
      interval ? 10,
      enabled ? true,
    }:
    {
      inherit
        command
        timeout
        interval
        enabled
        ;
    };
}
