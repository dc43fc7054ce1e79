from services.ingester.service import run_ingester
from shared.service import run_service

if __name__ == "__main__":
    run_service("ingester", run_ingester)
