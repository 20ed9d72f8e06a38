"""The emulated CPU core: runs guest programs one step at a time."""
