"""Serve the deployments of deployments/prefect.yaml from this process, no work pool or worker needed.

    python deployments/serve.py              # every study on its schedule
    python deployments/serve.py quick        # only these deployments

Same as `metapeft serve [NAME ...]`; run it from the project root (config paths are relative to it).
"""
import sys

from flows.environment import configure

if __name__ == "__main__":
    configure()
    from flows.schedules import serve

    serve(sys.argv[1:])
