//! gpumarket-validator: a real Solana validator (Agave `TestValidatorGenesis`) for gpumarket's
//! local testbed. SPL Token, Token-2022, Memo (v1 + v3) and ATA are in genesis by default.
//! stdout carries exactly one line, `READY rpc=http://127.0.0.1:PORT faucet=<pubkey>`; logs go
//! to `<ledger>/validator.log` (filter: RUST_LOG), anything else to stderr.
//!
//! `--account-dir DIR` stands in for programs this testbed cannot run: a file
//! `DIR/<address>.account` (32 bytes of owner program id, then the data) is stored at `<address>`
//! in the working bank whenever the file changes, as the owner program would write it. The local
//! environment posts Pyth price updates this way (a real feed is posted through Wormhole-verified
//! messages, which need mainnet's guardians).
use {
    anyhow::{anyhow, bail, Context, Result},
    clap::Parser,
    signal_hook::{consts::signal::*, iterator::Signals},
    solana_account::{AccountSharedData, WritableAccount},
    solana_keypair::{read_keypair_file, write_keypair_file, Keypair},
    solana_pubkey::Pubkey,
    solana_rpc::rpc::JsonRpcConfig,
    solana_runtime::bank_forks::BankForks,
    solana_signer::Signer,
    solana_streamer::socket::SocketAddrSpace,
    solana_test_validator::TestValidatorGenesis,
    std::time::{Duration, Instant},
    std::{
        collections::HashMap,
        fs::File,
        io::Write,
        os::fd::FromRawFd,
        path::{Path, PathBuf},
        str::FromStr,
        sync::RwLock,
        thread,
        time::SystemTime,
    },
};

/// Solana test validator for gpumarket's local testbed.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Ledger directory (created if missing; an existing ledger is reused).
    #[arg(long)]
    ledger: PathBuf,
    /// JSON-RPC port (bound on 0.0.0.0); PubSub takes PORT+1. Keep both outside --port-range.
    #[arg(long)]
    rpc_port: u16,
    /// Port range A-B for gossip/TPU/TVU/repair (26 sockets; give it 100+; avoid 8000-10000).
    #[arg(long, value_parser = parse_range)]
    port_range: (u16, u16),
    /// Mint (faucet) keypair: read if the file exists, else generated and written there.
    /// Default: <ledger>/faucet-keypair.json.
    #[arg(long)]
    faucet_keypair: Option<PathBuf>,
    /// Accounts to store as files there change (see the crate docs).
    #[arg(long)]
    account_dir: Option<PathBuf>,
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| p.parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
    match s.split_once('-') {
        Some((a, b)) if port(a)? < port(b)? => Ok((port(a)?, port(b)?)),
        _ => Err("expected A-B with A < B".into()),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (a, b) = args.port_range;
    if (a..=b).contains(&args.rpc_port) || (a..=b).contains(&args.rpc_port.wrapping_add(1)) {
        bail!(
            "--rpc-port {} and {} must lie outside --port-range {a}-{b}",
            args.rpc_port,
            args.rpc_port.wrapping_add(1)
        );
    }
    // The library println!s progress ("Waiting for fees to stabilize"): keep a private copy of
    // stdout for the READY line and point fd 1 at stderr.
    let mut ready_out = unsafe {
        let fd = libc::fcntl(libc::STDOUT_FILENO, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 || libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) < 0 {
            bail!("redirecting stdout: {}", std::io::Error::last_os_error());
        }
        File::from_raw_fd(fd)
    };
    let mut signals = Signals::new([SIGTERM, SIGINT])?;

    std::fs::create_dir_all(&args.ledger)
        .with_context(|| format!("creating {}", args.ledger.display()))?;
    agave_logger::setup_file_with_default(
        &args.ledger.join("validator.log"),
        "solana=info,agave=info,solana_metrics=warn",
    );
    let faucet_path =
        args.faucet_keypair.unwrap_or_else(|| args.ledger.join("faucet-keypair.json"));
    let mint = if faucet_path.exists() {
        read_keypair_file(&faucet_path)
            .map_err(|e| anyhow!("reading {}: {e}", faucet_path.display()))?
    } else {
        if TestValidatorGenesis::ledger_exists(&args.ledger) {
            bail!(
                "ledger {} exists but faucet keypair {} does not",
                args.ledger.display(),
                faucet_path.display()
            );
        }
        let kp = Keypair::new();
        write_keypair_file(&kp, &faucet_path)
            .map_err(|e| anyhow!("writing {}: {e}", faucet_path.display()))?;
        kp
    };

    let started = Instant::now();
    let validator = TestValidatorGenesis::default()
        .ledger_path(&args.ledger)
        .rpc_port(args.rpc_port)
        .port_range(args.port_range)
        .gossip_port(0) // otherwise gossip binds the *default* range's first port, not ours
        // Settlement looks up its transactions (getSignatureStatuses with history, getTransaction)
        // and finds deposits by their memo (getSignaturesForAddress): all need the history.
        .rpc_config(JsonRpcConfig {
            enable_rpc_transaction_history: true,
            ..JsonRpcConfig::default_for_test()
        })
        .start_with_mint_address(mint.pubkey(), SocketAddrSpace::Unspecified)
        .map_err(|e| anyhow!("validator failed to start: {e}"))?;

    // Ready = slots are advancing, a blockhash is available and the faucet holds SOL.
    let rpc = validator.get_rpc_client();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if signals.pending().next().is_some() {
            return Ok(()); // `validator` is dropped: clean shutdown
        }
        let slot = rpc.get_slot().unwrap_or(0);
        if slot > 2
            && rpc.get_latest_blockhash().is_ok()
            && rpc.get_balance(&mint.pubkey()).unwrap_or(0) > 0
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "validator not ready after 180 s (slot {slot}); see {}/validator.log",
                args.ledger.display()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!("[gpumarket-validator] ready in {:.1} s", started.elapsed().as_secs_f64());
    match lower_busy_polling_threads() {
        Ok(lowered) => {
            eprintln!("[gpumarket-validator] {lowered} busy-polling thread(s) at nice 19")
        }
        Err(e) => eprintln!("[gpumarket-validator] busy-polling threads keep their priority: {e}"),
    }
    writeln!(ready_out, "READY rpc=http://127.0.0.1:{} faucet={}", args.rpc_port, mint.pubkey())?;
    ready_out.flush()?;

    if let Some(dir) = args.account_dir {
        let bank_forks = validator.bank_forks();
        thread::spawn(move || store_accounts_from(&dir, &bank_forks));
    }

    let sig = signals.forever().next();
    eprintln!("[gpumarket-validator] signal {sig:?}, shutting down");
    thread::spawn(move || {
        if signals.forever().next().is_some() {
            std::process::exit(1); // second signal: give up on a clean shutdown
        }
    });
    thread::spawn(|| {
        thread::sleep(Duration::from_secs(30));
        eprintln!("[gpumarket-validator] shutdown took over 30 s, exiting anyway");
        std::process::exit(0);
    });
    drop(validator); // Validator::close(): stops services, flushes the ledger, joins threads
    Ok(())
}

/// Banking-stage threads that poll without ever sleeping while this validator is leader (on a
/// one-node testbed, always): the transaction scheduler keeps a whole core busy with no
/// transaction to schedule, which on a 2-core machine is half of what the control plane and
/// the tests have. At the lowest priority it still gets a slice every few milliseconds when the
/// machine is busy, and all it wants when it is not.
const BUSY_POLLING_THREADS: [&str; 1] = ["solBnkTxSched"];

/// Set the threads of [`BUSY_POLLING_THREADS`] to nice 19; returns how many there were.
fn lower_busy_polling_threads() -> Result<usize> {
    let mut lowered = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?;
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !BUSY_POLLING_THREADS.contains(&name.trim_end()) {
            continue;
        }
        let tid: libc::id_t = task.file_name().to_string_lossy().parse()?;
        // On Linux a thread id given as PRIO_PROCESS sets that one thread's nice value.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) } != 0 {
            bail!("setpriority({tid}): {}", std::io::Error::last_os_error());
        }
        lowered += 1;
    }
    Ok(lowered)
}

/// Store each `<address>.account` file of `dir` in the working bank when it is new or changed.
fn store_accounts_from(dir: &Path, bank_forks: &RwLock<BankForks>) -> ! {
    let mut stored: HashMap<PathBuf, SystemTime> = HashMap::new();
    loop {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Some(address) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".account"))
                .and_then(|a| Pubkey::from_str(a).ok())
            else {
                continue;
            };
            let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else { continue };
            if stored.get(&path) == Some(&modified) {
                continue;
            }
            match std::fs::read(&path) {
                Ok(bytes) if bytes.len() >= 32 => {
                    let owner = Pubkey::try_from(&bytes[..32]).expect("32 bytes");
                    if store(bank_forks, &address, &owner, &bytes[32..]) {
                        eprintln!("[gpumarket-validator] stored {address}");
                        stored.insert(path, modified);
                    }
                }
                _ => {} // being written: read it next time
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Store the account in the working bank; false when every bank tried had begun to freeze (a
/// frozen bank refuses stores: the next one takes it).
fn store(bank_forks: &RwLock<BankForks>, address: &Pubkey, owner: &Pubkey, data: &[u8]) -> bool {
    for _ in 0..50 {
        let bank = bank_forks.read().unwrap().working_bank();
        let lamports = bank.get_minimum_balance_for_rent_exemption(data.len());
        let mut account = AccountSharedData::new(lamports, data.len(), owner);
        account.data_as_mut_slice().copy_from_slice(data);
        // The bank may begin to freeze between the check and the store, which then panics
        // before writing anything (its first statement asserts it has not).
        let store = std::panic::AssertUnwindSafe(|| bank.store_account(address, &account));
        if !bank.freeze_started() && std::panic::catch_unwind(store).is_ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}
