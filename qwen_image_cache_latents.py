from musubi_tuner.qwen_image_cache_latents import main

if __name__ == "__main__":
    main()
