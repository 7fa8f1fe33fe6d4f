"""Space entry point: build the PoLar Explorer page and launch it."""
from app.ui import build_demo, launch_kwargs, warm_up

demo = build_demo()

if __name__ == "__main__":
    warm_up()
    demo.launch(**launch_kwargs())
