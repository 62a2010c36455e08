from musubi_tuner.kandinsky5_cache_text_encoder_outputs import main

if __name__ == "__main__":
    main()
