"""What is built on the library: the command line, the benchmark, the demo, the simulator."""
