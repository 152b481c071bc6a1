//! Tests of init.d scripts that keep the install, or the start script, in variables of their own
//! naming: forms written for the test, and fixtures changed into such forms at test time.

use super::*;
use std::path::Path;

const OLD: &str = "/opt/bb/8.19.3";
const NEW: &str = "/opt/bb/8.19.6";

fn edit(text: &str) -> Result<UnitEdit, ActivateError> {
    edit_initd_script(text, Path::new(OLD), Path::new(NEW))
}

/// Edits, checks the result is stable on a second run and points at the new install.
fn edited(text: &str) -> String {
    let e = edit(text).unwrap_or_else(|err| panic!("refused: {err}\n{text}"));
    assert_eq!(edit(&e.text).unwrap().text, e.text, "second run differs");
    assert_eq!(install_in_unit(&e.text).as_deref(), Some(Path::new(NEW)));
    e.text
}

fn refused(text: &str) -> String {
    match edit(text) {
        Err(ActivateError::Unsupported { reason, .. }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const HEADER: &str =
    "#!/bin/sh\n### BEGIN INIT INFO\n# Provides:          bitbucket\n### END INIT INFO\n";

#[test]
fn install_in_a_variable_of_its_own_name_then_its_bin() {
    let text = format!(
        "{HEADER}BB_APP={OLD}\nRUN_AS=atlbitbucket\ncase \"$1\" in\n  start) su - \"$RUN_AS\" -c \"$BB_APP/bin/start-bitbucket.sh\" ;;\n  stop) su - \"$RUN_AS\" -c \"${{BB_APP}}/bin/stop-bitbucket.sh\" ;;\nesac\n"
    );
    assert_eq!(install_in_unit(&text).as_deref(), Some(Path::new(OLD)));
    assert_eq!(
        edited(&text),
        format!(
            "{HEADER}BB_APP={NEW}\nRUN_AS=atlbitbucket\ncase \"$1\" in\n  start) su - \"$RUN_AS\" -c \"$BB_APP/bin/start-bitbucket.sh --no-search\" ;;\n  stop) su - \"$RUN_AS\" -c \"${{BB_APP}}/bin/stop-bitbucket.sh\" ;;\nesac\n"
        )
    );
}

#[test]
fn cd_into_the_variable_then_the_relative_start() {
    let text = format!(
        "{HEADER}export INSTALL=\"{OLD}\"\nstart() {{\n    ./start-bitbucket.sh\n}}\ncd \"$INSTALL/bin\" || exit 1\nstart\n"
    );
    assert_eq!(
        edited(&text),
        format!(
            "{HEADER}export INSTALL=\"{NEW}\"\nstart() {{\n    ./start-bitbucket.sh --no-search\n}}\ncd \"$INSTALL/bin\" || exit 1\nstart\n"
        )
    );
}

#[test]
fn start_script_named_through_a_variable() {
    let text = format!(
        "{HEADER}APP_DIR={OLD}\nSTART_SCRIPT=$APP_DIR/bin/start-bitbucket.sh\nSTOP_SCRIPT=\"${{APP_DIR}}/bin/stop-bitbucket.sh\"\ndo_start() {{\n    \"$START_SCRIPT\"\n}}\ndo_stop() {{\n    $STOP_SCRIPT\n}}\nas_user() {{\n    runuser -u bitbucket -- $START_SCRIPT >/dev/null 2>&1\n}}\n"
    );
    assert_eq!(
        edited(&text),
        format!(
            "{HEADER}APP_DIR={NEW}\nSTART_SCRIPT=$APP_DIR/bin/start-bitbucket.sh\nSTOP_SCRIPT=\"${{APP_DIR}}/bin/stop-bitbucket.sh\"\ndo_start() {{\n    \"$START_SCRIPT\" --no-search\n}}\ndo_stop() {{\n    $STOP_SCRIPT\n}}\nas_user() {{\n    runuser -u bitbucket -- $START_SCRIPT --no-search >/dev/null 2>&1\n}}\n"
        )
    );
}

#[test]
fn script_name_alone_in_a_variable_after_cd() {
    let text =
        format!("{HEADER}D={OLD}/bin\nS=start-bitbucket.sh\ncd $D\nsu bitbucket -c \"./$S\"\n");
    assert_eq!(
        edited(&text),
        format!(
            "{HEADER}D={NEW}/bin\nS=start-bitbucket.sh\ncd $D\nsu bitbucket -c \"./$S --no-search\"\n"
        )
    );
}

#[test]
fn no_search_already_given_through_a_variable_is_kept() {
    let text = format!("{HEADER}I={OLD}\nOPTS=--no-search\n$I/bin/start-bitbucket.sh $OPTS\n");
    assert_eq!(
        edited(&text),
        format!("{HEADER}I={NEW}\nOPTS=--no-search\n$I/bin/start-bitbucket.sh $OPTS\n")
    );
}

#[test]
fn home_inside_an_unversioned_install_stays() {
    let (old, new) = (Path::new("/opt/bb"), Path::new("/opt/bb-8.19.6"));
    let text = format!(
        "{HEADER}BITBUCKET_HOME=/opt/bb/home\nPIDFILE=$BITBUCKET_HOME/log/bitbucket.pid\nI=/opt/bb\n$I/bin/start-bitbucket.sh\n"
    );
    let e = edit_initd_script(&text, old, new).unwrap();
    assert_eq!(
        e.text,
        format!(
            "{HEADER}BITBUCKET_HOME=/opt/bb/home\nPIDFILE=$BITBUCKET_HOME/log/bitbucket.pid\nI=/opt/bb-8.19.6\n$I/bin/start-bitbucket.sh --no-search\n"
        )
    );
}

/// The Debian skeleton: `DAEMON=`, a `[ -x "$DAEMON" ]` test (not a call), start-stop-daemon with
/// the arguments after `--`.
#[test]
fn debian_skeleton_with_daemon_args() {
    let skeleton = |args: &str| {
        format!(
            "{HEADER}INSTALL={OLD}\nDAEMON=\"$INSTALL/bin/start-bitbucket.sh\"\nDAEMON_ARGS=\"{args}\"\n[ -x \"$DAEMON\" ] || exit 0\ndo_start() {{\n    start-stop-daemon --start --chuid bb --exec \"$DAEMON\" -- $DAEMON_ARGS || return 2\n}}\n"
        )
    };
    let e = edited(&skeleton("--no-search"));
    assert_eq!(e, skeleton("--no-search").replace(OLD, NEW));
    let reason = refused(&skeleton(""));
    assert!(reason.contains("start-stop-daemon"), "{reason}");
}

#[test]
fn a_test_of_the_start_script_is_not_a_call() {
    let text = format!(
        "{HEADER}S={OLD}/bin/start-bitbucket.sh\nif [ -x $S ]; then $S; fi\ntest -f \"$S\" && \"$S\"\n"
    );
    assert_eq!(
        edited(&text),
        format!(
            "{HEADER}S={NEW}/bin/start-bitbucket.sh\nif [ -x $S ]; then $S --no-search; fi\ntest -f \"$S\" && \"$S\" --no-search\n"
        )
    );
}

#[test]
fn a_quoted_start_command_gets_the_flag_after_its_quotes() {
    let text = format!("{HEADER}\"{OLD}/bin/start-bitbucket.sh\" &\n");
    assert_eq!(
        edited(&text),
        format!("{HEADER}\"{NEW}/bin/start-bitbucket.sh\" --no-search &\n")
    );
}

#[test]
fn install_variable_through_a_current_link_switches_the_link() {
    let text = format!("{HEADER}BB=/opt/bb/current\n$BB/bin/start-bitbucket.sh\n");
    let e = edit(&text).unwrap();
    assert_eq!(e.via_link.as_deref(), Some(Path::new("/opt/bb/current")));
    assert_eq!(
        e.text,
        format!("{HEADER}BB=/opt/bb/current\n$BB/bin/start-bitbucket.sh --no-search\n")
    );
}

#[test]
fn refused_forms_say_why() {
    let pieces = format!("{HEADER}BASE=/opt/bb\nV=8.19.3\ncd $BASE/$V/bin\n./start-bitbucket.sh\n");
    assert!(refused(&pieces).contains("built from pieces"), "{pieces}");

    let two = format!(
        "{HEADER}if [ -d /x ]; then\n  X={OLD}\nelse\n  X=/opt/bb/8.19.1\nfi\n$X/bin/start-bitbucket.sh\n"
    );
    assert!(refused(&two).contains("assigned different values"));

    let home = format!("{HEADER}X={OLD}\nBITBUCKET_HOME=$X/../home\n$X/bin/start-bitbucket.sh\n");
    assert!(refused(&home).contains("move the home"));

    let fg = format!("{HEADER}S={OLD}/bin/start-bitbucket.sh\nexec $S -fg\n");
    assert!(refused(&fg).contains("foreground"));

    let computed = format!("{HEADER}S=$(ls -d /opt/bb/8.*)/bin/start-bitbucket.sh\n\"$S\"\n");
    assert!(refused(&computed).contains("calls neither"), "{computed}");

    let third = format!("{HEADER}X=/opt/bb/8.19.1\n$X/bin/start-bitbucket.sh\n");
    assert!(refused(&third).contains("neither the old install"));
}

fn fixture(name: &str) -> Option<String> {
    let dir = super::tests::fixtures()?;
    Some(std::fs::read_to_string(dir.join(name)).unwrap())
}

/// The installer's own template does `cd $BITBUCKET_BIN`; written that way, it is edited at the
/// variable.
#[test]
fn installer_fixture_with_its_bin_in_a_variable() {
    let Some(text) = fixture("initd/atlbitbucket-installer-4.8.1") else {
        return;
    };
    let (old, new) = (
        "/opt/atlassian/bitbucket/4.8.1",
        "/opt/atlassian/bitbucket/4.8.5",
    );
    let cd = format!("cd {old}/bin\n");
    assert!(text.contains(&cd));
    let text = text.replace(&cd, &format!("MY_BIN={old}/bin\ncd $MY_BIN\n"));
    let e = edit_initd_script(&text, Path::new(old), Path::new(new)).unwrap();
    assert!(e.text.contains(&format!("MY_BIN={new}/bin\ncd $MY_BIN\n")));
    assert!(!e.text.contains(old));
    assert_eq!(install_in_unit(&e.text).as_deref(), Some(Path::new(new)));
}

/// The Red Hat script of puppet-bitbucket, its install moved into a variable and the start script
/// into another, without the `--no-search` the module was rendered with.
#[test]
fn redhat_fixture_with_its_install_and_start_in_variables() {
    let Some(text) = fixture("initd/puppet-bitbucket-redhat.initd") else {
        return;
    };
    let old = "/opt/bitbucket/atlassian-bitbucket-7.2.2";
    let new = "/opt/bitbucket/atlassian-bitbucket-7.2.5";
    let start = format!("${{sucmd}} {old}/bin/start-bitbucket.sh --no-search\n");
    let stop = format!("${{sucmd}} {old}/bin/stop-bitbucket.sh\n");
    assert!(text.contains(&start) && text.contains(&stop));
    let text = text
        .replace(&start, "${sucmd} \"$BB_START\"\n")
        .replace(&stop, "${sucmd} $WEBAPP/bin/stop-bitbucket.sh\n")
        .replacen(
            "export CATALINA_HOME=",
            &format!(
                "WEBAPP={old}\nBB_START=${{WEBAPP}}/bin/start-bitbucket.sh\nexport CATALINA_HOME="
            ),
            1,
        );
    let e = edit_initd_script(&text, Path::new(old), Path::new(new)).unwrap();
    assert!(
        e.text.contains("${sucmd} \"$BB_START\" --no-search\n"),
        "{}",
        e.text
    );
    assert!(e.text.contains(&format!("WEBAPP={new}\n")));
    assert!(e.text.contains(&format!("export CATALINA_HOME={new}\n")));
    assert!(!e.text.contains(old));
    assert_eq!(
        edit_initd_script(&e.text, Path::new(old), Path::new(new))
            .unwrap()
            .text,
        e.text
    );
}
