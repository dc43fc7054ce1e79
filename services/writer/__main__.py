from services.writer.service import run_writer
from shared.service import run_service

if __name__ == "__main__":
    run_service("writer", run_writer)
