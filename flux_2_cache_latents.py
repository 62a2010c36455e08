from musubi_tuner.flux_2_cache_latents import main

if __name__ == "__main__":
    main()
