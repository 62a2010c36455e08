from musubi_tuner.estimate_memory import main

if __name__ == "__main__":
    main()
