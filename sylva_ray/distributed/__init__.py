"""The Ray transport, and the only package that imports ``ray``: client and driver actors, the
placement of actors on a cluster, waiting for an autoscaler, connecting, launching a run, and the
Ray Tune glue. Runs the engine's jobs; adds no math."""
