#!/bin/sh
# Dataflow (and a portable runner's DOCKER environment) start this image with the Beam SDK
# harness's flags only (--id=..., --control_endpoint=...): those go to Beam's launcher, which
# starts the data step's workers. Any command (KFP's executor, `torchship ...`) runs as given.
case "$1" in
  --*) exec /opt/apache/beam/boot "$@" ;;
esac
exec "$@"
