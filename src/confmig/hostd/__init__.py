"""The host daemon: the composition root that wires the emulated kernel
(:mod:`confmig.kvm`) to the emulated silicon (:mod:`confmig.platform`) and the
guest code it runs (:mod:`confmig.guest`). Nothing else imports both sides."""
