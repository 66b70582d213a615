"""The fps-graph command line (installed as the `fps_graph_cli` package)."""
