# Option types the Procurator modules share.
lib: {
  # A string, not a Nix path, and outside the Nix store: the store is
  # world-readable, so a key there could be read by every user of every
  # machine it is copied to. (A path literal such as ./tls.key is refused
  # because interpolating it would copy the key into the store.)
  secretPath =
    lib.types.addCheck (lib.types.strMatching "/.+") (path: !lib.hasPrefix builtins.storeDir path)
    // {
      description = "absolute path outside the Nix store";
    };

  # What runs a VM: a blueprint machine's `deployment.backend` for VMs, a VM
  # host's `--vmm` (procurator_core::artifact::VM_BACKENDS).
  vmm = lib.types.enum [
    "cloud-hypervisor"
    "qemu"
  ];
}
