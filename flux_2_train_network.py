from musubi_tuner.flux_2_train_network import main

if __name__ == "__main__":
    main()
