from musubi_tuner.kandinsky5_generate_video import main

if __name__ == "__main__":
    main()
