"""`di-router plan`: layouts simulated in virtual time on the simulator\x27s engine."""
