#!/usr/bin/env python3
"""Simulated sensors for the web dashboard: each publishes a JSON reading every INTERVAL seconds
to sensors/<id>/reading, like the seed's Raspberry Pi gateway publishing /IoTSensor/Sensor01/reading.

    python sensor.py --port 1885                      # broker's own TCP port (loopback)
    python sensor.py --port 1885 --sensors 3 --interval 0.5 --count 20

Payload: {"sensor": "sensor-01", "temperature": 21.4, "humidity": 48.2, "seq": 7, "ts": 1733390000.123}
The readings are a slow random walk, so the page's sparklines move. Needs paho-mqtt (>= 2.0).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=1885, help="broker port (default 1885)")
    ap.add_argument("--sensors", type=int, default=3, help="how many simulated sensors (default 3)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between readings (default 1)")
    ap.add_argument("--count", type=int, default=0, help="stop after this many rounds (default 0: run until stopped)")
    ap.add_argument("--topic", default="sensors/{id}/reading", help="topic template (default sensors/{id}/reading)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (repeatable readings)")
    args = ap.parse_args(argv)

    rnd = random.Random(args.seed)
    ids = [f"sensor-{i + 1:02d}" for i in range(args.sensors)]
    temp = {s: 19.0 + 4 * rnd.random() for s in ids}
    hum = {s: 40.0 + 15 * rnd.random() for s in ids}

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-sensors-{rnd.randrange(1 << 30):x}")
    client.reconnect_delay_set(1, 5)
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print(f"sensor.py: {len(ids)} sensors -> {args.host}:{args.port} every {args.interval}s "
          f"({args.topic.format(id='<id>')})", flush=True)
    seq = 0
    try:
        while not stop and (args.count <= 0 or seq < args.count):
            seq += 1
            for i, s in enumerate(ids):
                # A daily-cycle-ish drift plus noise, kept in a plausible indoor range.
                temp[s] = min(30.0, max(15.0, temp[s] + 0.15 * math.sin(seq / 10 + i) + rnd.gauss(0, 0.12)))
                hum[s] = min(70.0, max(30.0, hum[s] + rnd.gauss(0, 0.4)))
                payload = {"sensor": s, "temperature": round(temp[s], 2), "humidity": round(hum[s], 1),
                           "seq": seq, "ts": round(time.time(), 3)}
                client.publish(args.topic.format(id=s), json.dumps(payload), qos=0)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
