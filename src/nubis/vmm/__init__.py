"""The VMM: config model, builder, vCPU threads, device workers, lifecycle, control loop."""
