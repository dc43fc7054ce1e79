import sys

from services.projectors.service import projector_main
from shared.projections.registry import PROJECTIONS
from shared.service import run_service

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in PROJECTIONS:
        print(f"usage: python -m services.projectors {{{'|'.join(PROJECTIONS)}}}", file=sys.stderr)
        sys.exit(2)
    name = sys.argv[1]
    run_service(f"projector-{name}", projector_main(name))
