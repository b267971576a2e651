"""Demo agent with no port and no health check (like 29 of the fleet's agents): it only
works in the background. The supervisor calls it ready once it has stayed up start_s."""
import time

n = 0
while True:
    n += 1
    print(f"MemoryDecayManager: decay pass {n}", flush=True)
    time.sleep(5)
