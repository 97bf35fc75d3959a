{
  description = "Procurator: GitOps for NixOS fleets";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems =
        f:
        builtins.listToAttrs (
          map (system: {
            name = system;
            value = f nixpkgs.legacyPackages.${system};
          }) systems
        );

      binaries = {
        procurator-control-plane = "Procurator's control plane: the gRPC server agents dial into";
        procurator-agent = "Procurator's agent: pulls, activates and health-checks this machine's closure";
        procurator-ctl = "Procurator's CLI for CI and operators";
      };

      mkBinaries =
        pkgs:
        builtins.mapAttrs (
          binary: description: pkgs.callPackage ./nix/package.nix { inherit binary description; }
        ) binaries;

      mkPackages =
        pkgs:
        let
          built = mkBinaries pkgs;
        in
        built
        // {
          default = pkgs.symlinkJoin {
            name = "procurator-${built.procurator-ctl.version}";
            paths = builtins.attrValues built;
            meta = {
              description = "Procurator's three binaries";
              mainProgram = "procurator-ctl";
            };
          };
        };

      # The modules default their package to this flake's build for the
      # machine's platform. The key lets the module system drop a second
      # import (say of both `default` and `agent`) instead of defining the
      # package twice.
      withPackage =
        name: module: service: binary:
        { lib, pkgs, ... }:
        {
          key = "procurator#nixosModules.${name}";
          _file = "${toString ./flake.nix}#nixosModules.${name}";
          imports = [ module ];
          config.services.${service}.package =
            lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.${binary};
        };
    in
    {
      # Plain Nix without nixpkgs: `nix eval .#blueprintJSON` of a cluster
      # flake never fetches or evaluates nixpkgs.
      lib = import ./nix/lib.nix;

      packages = forAllSystems mkPackages;

      # pkgs.procurator-{agent,control-plane,ctl}, for those who set the
      # modules' `package` from their own pkgs.
      overlays.default = final: _prev: mkBinaries final;

      nixosModules = {
        agent = withPackage "agent" ./nix/modules/agent.nix "procurator-agent" "procurator-agent";
        control-plane =
          withPackage "control-plane" ./nix/modules/control-plane.nix "procurator-control-plane"
            "procurator-control-plane";
        # For systems that run as VMs of a VM host: mounts the host's store
        # and prints the readiness line the host waits for.
        vm-guest = ./nix/modules/vm-guest.nix;
        default = {
          imports = [
            self.nixosModules.agent
            self.nixosModules.control-plane
            self.nixosModules.vm-guest
          ];
        };
      };
    };
}
