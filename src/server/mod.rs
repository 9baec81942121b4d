//! The SFTP server side: accounts, sshd configuration and checks (being written).
