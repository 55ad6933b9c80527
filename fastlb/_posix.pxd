# POSIX declarations shared by fastlb's C engines: the relay (fastlb/_crelay.pyx) and HTTP mode's
# engine (fastlb/http/_fast.pyx). Extern declarations only: cimported, nothing to import at run time.
from libc.stdint cimport uint32_t, uint64_t

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDHUP, EPOLLET, EPOLLEXCLUSIVE
        EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL, EPOLL_CLOEXEC

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct sockaddr:
        unsigned short sa_family
    cdef struct sockaddr_storage:
        unsigned short ss_family
    int shutdown(int fd, int how)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int accept4(int fd, sockaddr *addr, socklen_t *len, int flags)
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    int getsockopt(int fd, int level, int name, void *value, socklen_t *len)
    int getsockname(int fd, sockaddr *addr, socklen_t *len)
    int setsockopt(int fd, int level, int name, const void *value, socklen_t len)
    enum:
        SHUT_WR, MSG_NOSIGNAL, SOCK_NONBLOCK, SOCK_CLOEXEC, AF_INET, AF_INET6, SOCK_STREAM, SOL_SOCKET, SO_ERROR

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP
    cdef struct in_addr:
        uint32_t s_addr
    cdef struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    cdef struct in6_addr:
        unsigned char s6_addr[16]
    cdef struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    unsigned short ntohs(unsigned short v)
    unsigned short htons(unsigned short v)
    uint32_t ntohl(uint32_t v)

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    int inet_pton(int af, const char *src, void *dst)

cdef extern from "<time.h>" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum:
        CLOCK_MONOTONIC_COARSE, CLOCK_MONOTONIC
