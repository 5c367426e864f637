//! `pin_thread_count` fixes candle's thread count in the environment without changing it, and
//! leaves rayon's global pool at its own default. One test in its own binary: it changes the
//! process environment.

#[test]
fn pin_thread_count_keeps_candles_and_rayons_counts() {
    std::env::remove_var("RAYON_NUM_THREADS");
    // candle counts the CPUs of this mask (read once, here first): one, so that its count
    // differs from rayon's default on any machine with two or more CPUs
    std::env::set_var("CANDLE_CPU_MASK", "0");
    let candle = candle_core::utils::get_num_threads();
    assert_eq!(candle, 1);
    let logical = std::thread::available_parallelism().unwrap().get();
    model::pin_thread_count();
    assert_eq!(std::env::var("RAYON_NUM_THREADS").as_deref(), Ok("1"));
    assert_eq!(candle_core::utils::get_num_threads(), candle);
    assert_eq!(rayon::current_num_threads(), logical);
    // a count the user chose stays
    std::env::set_var("RAYON_NUM_THREADS", "7");
    model::pin_thread_count();
    assert_eq!(std::env::var("RAYON_NUM_THREADS").as_deref(), Ok("7"));
}
