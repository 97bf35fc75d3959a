# Stands in for nixpkgs.lib.nixosSystem where there is no nixpkgs: returns
# what Procurator reads, `config.system.build.toplevel`, as a small
# NixOS-shaped closure. It records the host name mkCluster sets and the
# `procuratorTest.marker` of the machine's configuration, so the tests can
# tell which modules reached which machine.
{
  modules,
  system ? null,
  specialArgs ? { },
}:
let
  attrsModules = builtins.filter builtins.isAttrs modules;
  valuesOf =
    get: builtins.concatMap (module: if get module == null then [ ] else [ (get module) ]) attrsModules;
  hostNames = valuesOf (module: module.networking.hostName or null);
  markers = valuesOf (module: module.procuratorTest.marker or null);
  hostName =
    if builtins.length hostNames == 1 then
      builtins.head hostNames
    else
      throw "fake nixosSystem: expected one networking.hostName, got ${builtins.toJSON hostNames}";
in
{
  config.system.build.toplevel = builtins.derivation {
    name = "nixos-system-${hostName}";
    # Builds here whatever the machine's platform: the sandbox runs x86_64.
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [
      "-c"
      ''
        mkdir -p $out/bin
        printf '%s\n' '${hostName}' > $out/hostname
        printf '%s\n' '${toString system}' > $out/system
        printf '%s\n' '${builtins.concatStringsSep " " markers}' > $out/markers
        printf '%s\n' '${builtins.concatStringsSep " " (builtins.attrNames specialArgs)}' > $out/special-args
        printf '#!/bin/sh\necho "switch-to-configuration of ${hostName}: $1"\n' > $out/bin/switch-to-configuration
        chmod +x $out/bin/switch-to-configuration
      ''
    ];
  };
}
