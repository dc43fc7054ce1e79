from services.relay.service import run_relay
from shared.service import run_service

if __name__ == "__main__":
    run_service("relay", run_relay)
