from services.web.service import run_web
from shared.service import run_service

if __name__ == "__main__":
    run_service("web", run_web)
