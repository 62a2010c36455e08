"""``python -m musubi_tuner.demo``: see ``musubi_tuner.demo.run_demo``."""

from musubi_tuner.demo.run_demo import main

if __name__ == "__main__":
    main()
