from musubi_tuner.flux_2_cache_text_encoder_outputs import main

if __name__ == "__main__":
    main()
