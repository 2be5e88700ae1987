"""nbdrep's front end: the nbdkit Python plugin, its back end over files and block devices, the
control socket and the ``nbdrep`` command line."""
