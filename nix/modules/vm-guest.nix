# procurator.vmGuest: a NixOS system that runs as a Procurator VM. A VM host
# boots the system closure directly (its kernel, initrd, init) and shares
# its own /nix/store with the guest read-only; this module mounts it (with a
# writable layer on top, so the guest's own agent can copy closures in for
# in-place updates) and prints the readiness line the host waits for.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (import ./types.nix lib) vmm;
  cfg = config.procurator.vmGuest;
  qemu = cfg.vmm == "qemu";
in
{
  options.procurator.vmGuest = {
    enable = lib.mkEnableOption "running this system as a VM of a Procurator VM host";

    vmm = lib.mkOption {
      type = vmm;
      default = "cloud-hypervisor";
      description = ''
        The VMM the host runs this VM under, as the blueprint's
        `deployment.backend` says: the host's store arrives over virtiofs
        (cloud-hypervisor) or 9p (QEMU).
      '';
    };

    readyInterval = lib.mkOption {
      type = lib.types.ints.positive;
      default = 5;
      description = ''
        Seconds between readiness lines on the serial console. The line is
        repeated because the kernel's own messages can cut into it.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    # The host boots the closure's kernel and initrd directly and attaches
    # no disk: no boot loader, and a root in memory. What must outlive a
    # restart belongs on the network (or define your own `/`).
    boot.loader.grub.enable = lib.mkDefault false;
    fileSystems."/" = lib.mkDefault {
      device = "tmpfs";
      fsType = "tmpfs";
      options = [ "mode=0755" ];
    };
    # The host's store, tagged `nix-store` by the VMM, read-only.
    fileSystems."/nix/.ro-store" = {
      device = "nix-store";
      fsType = if qemu then "9p" else "virtiofs";
      options = [
        "ro"
      ]
      ++ lib.optionals qemu [
        "trans=virtio"
        "version=9p2000.L"
        "msize=262144"
        "cache=loose"
      ];
      neededForBoot = true;
    };
    # What the guest adds (closures its agent copies in) lives in memory and
    # goes with a restart, when the host boots the closure it holds.
    fileSystems."/nix/.rw-store" = {
      device = "tmpfs";
      fsType = "tmpfs";
      options = [ "mode=0755" ];
      neededForBoot = true;
    };
    # NixOS's overlay file systems (24.05 and later) create the upper and
    # work directories themselves.
    fileSystems."/nix/store" = {
      overlay = {
        lowerdir = [ "/nix/.ro-store" ];
        upperdir = "/nix/.rw-store/store";
        workdir = "/nix/.rw-store/work";
      };
      neededForBoot = true;
    };
    boot.initrd.availableKernelModules = [
      "virtio_pci"
      "overlay"
    ]
    ++ (
      if qemu then
        [
          "9p"
          "9pnet_virtio"
        ]
      else
        [ "virtiofs" ]
    );
    # The host's health check of a VM it (re)starts: once the boot has
    # finished, `procurator-ready <the closure running>` when every unit
    # came up, else `procurator-unhealthy <closure> <why>`, as the host's
    # wait_ready reads them from the serial console.
    systemd.services.procurator-vm-ready = {
      description = "Tell the Procurator VM host which closure runs, and whether it is healthy";
      wantedBy = [ "multi-user.target" ];
      serviceConfig = {
        Type = "simple";
        StandardOutput = "tty";
        TTYPath = "/dev/ttyS0";
        Restart = "always";
      };
      path = [
        pkgs.coreutils
        config.systemd.package
      ];
      script = ''
        closure=$(readlink -f /run/current-system)
        state=$(systemctl is-system-running --wait || true)
        if [ "$state" = running ]; then
          line="procurator-ready $closure"
        else
          failed=$(systemctl list-units --failed --plain --no-legend | cut -d' ' -f1 | tr '\n' ' ')
          line="procurator-unhealthy $closure $state: failed units: ''${failed:-none}"
        fi
        while true; do
          echo "$line"
          sleep ${toString cfg.readyInterval}
        done
      '';
    };
  };
}
