from musubi_tuner.kandinsky5_train_network import main

if __name__ == "__main__":
    main()
