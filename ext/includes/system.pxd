# Declarations of the Linux C APIs the engine uses (epoll, splice, sockets), all nogil.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

cdef extern from "compat.h" nogil:
    int fp_errno()
    int64_t fp_now_ms()
    double fp_wall_time()
    double fp_mono_time()
    int FP_DEBUG
    int fp_load(const int* p)
    void fp_store(int* p, int v)
    int fp_exchange(int* p, int v)
    int fp_add(int* p, int v)
    uint8_t fp_load8(const uint8_t* p)
    void fp_store8(uint8_t* p, uint8_t v)
    uint8_t fp_exchange8(uint8_t* p, uint8_t v)

    # errno values
    int EAGAIN, EWOULDBLOCK, EINTR, EINPROGRESS, EMFILE, ENFILE, ENOBUFS, ENOMEM
    int ECONNRESET, EPIPE, ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH, ENETUNREACH, ECONNABORTED
    int EADDRNOTAVAIL

    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    cdef struct sockaddr:
        sa_family_t sa_family
    cdef struct sockaddr_storage:
        sa_family_t ss_family
    cdef struct in_addr:
        uint32_t s_addr
    cdef struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    cdef struct in6_addr:
        uint8_t s6_addr[16]
    cdef struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        in6_addr sin6_addr
    cdef struct sockaddr_un:
        sa_family_t sun_family
        char sun_path[108]

    int AF_INET, AF_INET6, AF_UNIX
    int SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC
    int SOL_SOCKET, SO_ERROR, SO_LINGER, IPPROTO_TCP, TCP_NODELAY
    int IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, EADDRINUSE
    int SHUT_WR, SHUT_RDWR
    int MSG_NOSIGNAL, MSG_TRUNC, MSG_PEEK
    int INET6_ADDRSTRLEN

    cdef struct linger:
        int l_onoff
        int l_linger

    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr* addr, socklen_t len)
    int bind(int fd, const sockaddr* addr, socklen_t len)
    int accept4(int fd, sockaddr* addr, socklen_t* len, int flags)
    int getsockopt(int fd, int level, int name, void* val, socklen_t* len)
    int setsockopt(int fd, int level, int name, const void* val, socklen_t len)
    int getsockname(int fd, sockaddr* addr, socklen_t* len)
    int shutdown(int fd, int how)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int close(int fd)
    ssize_t read(int fd, void* buf, size_t n)
    ssize_t write(int fd, const void* buf, size_t n)
    int pipe2(int fds[2], int flags)
    int O_NONBLOCK, O_CLOEXEC
    int fcntl(int fd, int cmd, ...)
    int F_GETPIPE_SZ

    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)
    int inet_pton(int af, const char* src, void* dst)
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

    ssize_t splice(int fd_in, void* off_in, int fd_out, void* off_out, size_t len, unsigned int flags)
    int SPLICE_F_MOVE, SPLICE_F_NONBLOCK

    # epoll
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDHUP, EPOLLET
    int EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL, EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* ev)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
