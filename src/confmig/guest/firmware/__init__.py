"""Guest firmware: boot (:mod:`.boot`), its fw_cfg driver and the boot-info block it
hands the kernel."""
