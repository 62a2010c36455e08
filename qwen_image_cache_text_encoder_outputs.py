from musubi_tuner.qwen_image_cache_text_encoder_outputs import main

if __name__ == "__main__":
    main()
