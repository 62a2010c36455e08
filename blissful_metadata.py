from blissful_tuner.read_metadata import main

if __name__ == "__main__":
    main()
