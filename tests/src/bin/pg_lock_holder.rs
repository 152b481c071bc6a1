//! Takes cluster `prod`'s lock in the PostgreSQL journal at the URL given, prints `HOLDING` and
//! holds it until killed: the process `shared_journal_pg` kills to see its lock freed.
use std::io::Write;

fn main() {
    let url = std::env::args()
        .nth(1)
        .expect("usage: pg-lock-holder POSTGRES_URL");
    let j = bbupgrade::journal::Journal::open_postgres(&url).expect("opening the journal");
    let _lock = j
        .acquire_lock("prod", &format!("child@test:{}", std::process::id()))
        .expect("taking the lock");
    println!("HOLDING");
    std::io::stdout().flush().expect("writing HOLDING");
    // Held until the test kills this process; the bound only keeps a forgotten child from lingering.
    std::thread::sleep(std::time::Duration::from_secs(120));
}
