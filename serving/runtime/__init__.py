"""The process around the core: flags to config, server composition, event loops, TLS,
authentication, CPU affinity, and running graft-serve as a child process."""
